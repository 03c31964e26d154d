"""Calling a transformers causal LM with a KV cache, whatever its transformers 5 version names it.

The HF backend (``backends/hf.py``), the prompt-learning prefix (``adapters/virtual_tokens.py``) and
the ONNX export (``export/onnx.py``) all run a model's own forward over a ``DynamicCache``; this is
the one place that knows how the cache is passed.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch

from lmforge.serving.model.types import ServedModel

if TYPE_CHECKING:
    from transformers import DynamicCache


@functools.cache
def cache_kwarg(model_class: type[ServedModel]) -> str:
    """The name ``model_class.forward`` takes its cache by: ``cache`` or ``past_key_values``."""
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40);
    # the project accepts any transformers 5, so pick whichever name this version takes.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def hf_forward(model: ServedModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               cache: DynamicCache, all_columns: bool = False) -> torch.Tensor:
    """Logits of the last input column ([rows, vocab]), or of every column ([rows, columns, vocab]);
    the cache grows in place."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=0 if all_columns else 1,
        **{cache_kwarg(type(model)): cache},
    )
    return out.logits if all_columns else out.logits[:, -1, :]
