"""The shapes of the models serving runs, for the type checker (Protocols: nothing here runs).

- :class:`ServedModel`: what the engine, the HF backend and the ONNX export use of a causal LM. A
  transformers ``PreTrainedModel`` has this shape, so does peft's wrapper around one (the
  LLaMA-Adapter, ``model/loading.py``) and an ONNX export dressed as one (``model/onnx_model.py``:
  ``OnnxCausalLM``).
- :class:`LlamaCausalLM`: the parts of a transformers ``LlamaForCausalLM`` the paged runner reads
  (``model/runner.py``), with the submodules' types. torch types every submodule reached by
  attribute as ``Tensor | Module``; ``runner.unsupported`` is the check that a model has this
  shape, and code past that check ``cast``s to it (the paged backend, LoRA slots).
- :class:`FilledCacheLayer`: a layer of a transformers ``DynamicCache`` once it holds keys and values.

Import the transformers names below only under ``TYPE_CHECKING`` elsewhere too: transformers takes
seconds to import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import GenerationConfig, LlamaConfig, PreTrainedConfig


class VocabularyRows(Protocol):
    """An input embedding as far as the engine reads it: its number of rows (the vocabulary size)."""

    @property
    def num_embeddings(self) -> int: ...


class ServedModel(Protocol):
    """A causal LM the engine serves: its config, device, generation defaults, input embedding and
    forward (called with keyword arguments; its signature names the KV cache argument)."""

    @property
    def config(self) -> PreTrainedConfig: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def generation_config(self) -> GenerationConfig: ...

    @property
    def forward(self) -> Callable[..., Any]: ...

    def get_input_embeddings(self) -> nn.Module | VocabularyRows: ...

    def __call__(self, **kwargs: Any) -> Any: ...


class FilledCacheLayer(Protocol):
    """A full-attention ``DynamicLayer`` of a ``DynamicCache`` (``backends/hf.py``: ``check_cache_support``
    refuses every other kind) as serving reads it. transformers types a cache's layers as the union of
    every kind, and their keys and values as Optional for the time before the first update; this is a
    layer past that (``is_initialized``), which a ``cast`` names where the code knows it."""

    is_initialized: bool
    keys: torch.Tensor
    values: torch.Tensor


class HasWeight(Protocol):
    weight: torch.Tensor


class LlamaAttention(Protocol):
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module


class LlamaMlp(Protocol):
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module


class LlamaLayer(Protocol):
    self_attn: LlamaAttention
    mlp: LlamaMlp
    input_layernorm: HasWeight
    post_attention_layernorm: HasWeight


class LlamaLayers(Protocol):
    """The decoder layers (an ``nn.ModuleList``) as the runner and the LoRA slots walk them."""

    def __iter__(self) -> Iterator[LlamaLayer]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> LlamaLayer: ...


class LlamaRotary(Protocol):
    """The model's rotary module: (cos, sin) of ``positions`` in the dtype of ``x``."""

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class LlamaDecoder(Protocol):
    embed_tokens: HasWeight
    norm: HasWeight
    layers: LlamaLayers
    rotary_emb: LlamaRotary


class LlamaCausalLM(ServedModel, Protocol):
    """A transformers ``LlamaForCausalLM``: ``model`` (the decoder) and ``lm_head``."""

    @property
    def config(self) -> LlamaConfig: ...

    @property
    def model(self) -> LlamaDecoder: ...

    @property
    def lm_head(self) -> nn.Module: ...

    def get_input_embeddings(self) -> nn.Embedding: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight by name (tensor-parallel ranks receive rank 0's in this order)."""
        ...
