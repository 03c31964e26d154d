"""Serve peft prompt-learning adapters (prefix, P-tuning v2, prompt tuning, P-tuning) from the KV cache.

At serving time each of the four methods comes down to the same thing: ``P`` key/value entries per
layer that every sequence starts with, computed once at load (:func:`compute_prefix`).

- ``prefix`` / ``ptuning_v2`` (peft ``PREFIX_TUNING``): the adapter *is* per-layer keys and values.
  peft's ``get_prompt`` produces them (through the reparameterization MLP for ``prefix``) and hands
  them to the model as ``past_key_values``, so they enter the cache as they are: never rotated.
- ``prompt`` / ``ptuning`` (``PROMPT_TUNING``, ``P_TUNING``): ``P`` virtual token embeddings (for
  P-tuning, its prompt encoder's output) prepended to the prompt's embeddings. Being first, their
  keys and values depend on nothing after them, so running them once through the base model at
  positions ``0..P-1`` gives the cache entries every sequence would compute.

Either way the prompt's tokens follow at positions ``P, P+1, ...`` (peft offsets the position ids
of prefix methods by ``P``; the virtual tokens of prompt methods occupy ``0..P-1``). The backends
(``backends/paged.py``, ``backends/hf.py``) place the prefix at the start of every sequence's cache
and shift its positions by ``P``; the engine counts ``P`` against the context window. Virtual
tokens never produce logits, so they never appear in text, echo or logprobs.

Used by ``model/loading.py``; tested by ``pytest tests/integration/test_serving_prompt_adapters.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers import DynamicCache

from lmforge.core.errors import ServingError
from lmforge.serving.model.hf_forward import cache_kwarg
from lmforge.serving.model.kv_cache import PagedKVCache
from lmforge.serving.model.ops import store_kv  # the runner's own cache write: casts, fp8 scaling
from lmforge.serving.model.types import FilledCacheLayer, ServedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
_ATTRIBUTE = "lmforge_virtual_prefix"  # where load_model leaves the prefix for the backends


@dataclass(frozen=True)
class VirtualPrefix:
    """The cache entries every sequence starts with; ``keys``/``values``: ``[layers, P, kv_heads, head_dim]``."""

    peft_type: str
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys.shape[1])


def peft_type(adapter_dir: Path) -> str:
    """The ``peft_type`` of a peft adapter directory ("unknown" without an adapter_config.json)."""
    config = adapter_dir / "adapter_config.json"
    return json.loads(config.read_text()).get("peft_type", "unknown") if config.exists() else "unknown"


def attach_prefix(model: PreTrainedModel, adapter_dir: Path) -> VirtualPrefix:
    """Compute ``adapter_dir``'s prefix for ``model`` (already on its serving device) and attach it."""
    prefix = compute_prefix(model, adapter_dir)
    setattr(model, _ATTRIBUTE, prefix)
    return prefix


def prefix_of(model: ServedModel) -> VirtualPrefix | None:
    """The prefix :func:`attach_prefix` attached to ``model``, if any."""
    return getattr(model, _ATTRIBUTE, None)


@torch.no_grad()
def compute_prefix(model: PreTrainedModel, adapter_dir: Path) -> VirtualPrefix:
    """The per-layer prefix keys and values of the prompt-learning adapter in ``adapter_dir``."""
    from peft import PeftModel

    kind = peft_type(adapter_dir)
    if kind not in PROMPT_LEARNING_TYPES:
        raise ServingError(f"{adapter_dir} holds a {kind} adapter, not a prompt-learning one",
                           f"pass an adapter of one of the types {', '.join(PROMPT_LEARNING_TYPES)}")
    # Prompt learning adds no modules to the base: the wrapper only owns the prompt encoder, so
    # ``model`` stays the plain base the backends run.
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ServingError(f"cannot load the {kind} adapter in {adapter_dir}: {exc}",
                           "serve the model/ directory a training run wrote (base weights, adapter/, marker)") from exc
    prompt = peft_model.get_prompt(batch_size=1)
    # The prompt encoder may sit elsewhere, in float32. A causal LM's input embedding is an nn.Embedding.
    weight = cast(nn.Embedding, model.get_input_embeddings()).weight
    dtype, device = weight.dtype, weight.device
    cache: object  # prefix tuning's prompt is the cache itself (peft types it a Tensor); checked below
    if kind == "PREFIX_TUNING":
        cache = prompt
    else:
        cache = _run_virtual_tokens(model, prompt.to(device=device, dtype=dtype))
    if not isinstance(cache, DynamicCache):
        raise ServingError(f"peft returned a {type(cache).__name__} prefix for {type(model).__name__}; "
                           "only models with a plain dynamic cache are supported",
                           "serve a Llama- or GPT-2-style model, or train with a mergeable method (lora)")
    layers = cast(list[FilledCacheLayer], cache.layers)  # filled by the prompt's forward
    keys = torch.stack([layer.keys[0] for layer in layers]).transpose(1, 2)
    values = torch.stack([layer.values[0] for layer in layers]).transpose(1, 2)
    keys, values = (t.to(device=device, dtype=dtype).contiguous() for t in (keys, values))
    return VirtualPrefix(kind, keys, values)


def _run_virtual_tokens(model: ServedModel, embeds: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    model(inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1,
          **{cache_kwarg(type(model)): cache})
    return cache


def check_fits(prefix: VirtualPrefix, layers: int, kv_heads: int, head_dim: int) -> None:
    """Refuse a prefix whose shape is not the model's cache shape (an adapter trained on another base)."""
    got = (prefix.keys.shape[0], prefix.keys.shape[2], prefix.keys.shape[3])
    if got != (layers, kv_heads, head_dim):
        raise ServingError(f"the adapter's prefix has (layers, kv_heads, head_dim) {got}, the model "
                           f"{(layers, kv_heads, head_dim)}", "serve the adapter with the base it was trained on")


class PagedPrefix:
    """Admission into a paged cache (``model/kv_cache.py``) for sequences that all start with ``prefix``.

    The prefix's whole blocks are written once into pinned blocks that every sequence's block table
    starts with (read-only: a sequence writes only at positions after the prefix); the remainder, if
    the prefix does not end on a block boundary, is copied into each sequence's first own block at
    admission. Without a prefix it is plain admission. ``tokens`` below exclude the prefix.
    """

    def __init__(self, prefix: VirtualPrefix | None, cache: PagedKVCache, kv_scale: float = 1.0) -> None:
        self.prefix = prefix
        self.cache = cache
        self.kv_scale = kv_scale  # an fp8 cache holds key / kv_scale (``model/ops.py``)
        self.length = prefix.length if prefix is not None else 0
        shape = cache.shape
        if prefix is not None:
            check_fits(prefix, shape.num_layers, shape.kv_heads, shape.head_dim)
        self.shared = cache.pin(self.length // cache.block_size)
        slots = [block * cache.block_size + i for block in self.shared for i in range(cache.block_size)]
        self._write(slots, 0)

    def fits_ever(self, tokens: int) -> bool:
        return self.cache.fits_ever(self.length + tokens, len(self.shared))

    def can_reserve(self, tokens: int, hashes: list[bytes] | None = None) -> bool:
        return self.cache.can_reserve(self.length + tokens, len(self.shared), hashes)

    def reserve(self, tokens: int, hashes: list[bytes] | None = None) -> int:
        """A row for ``tokens`` after the prefix; ``hashes``: its full prompt blocks' (prefix caching)."""
        row = self.cache.reserve(self.length + tokens, self.shared, hashes)
        start = len(self.shared) * self.cache.block_size
        # The prefix's partial last block: this sequence's own copy, unless that block is a cached one
        # (shared, so never written; it already holds the copy).
        if start < self.length and not self.cache.hits(row):
            self._write(self.cache.slots(row, start, self.length), start)
        return row

    @property
    def digest(self) -> str:
        """Identity of the prefix's content (prefix caching keys blocks by it): a hash of its keys and values."""
        if self.prefix is None:
            return ""
        data = hashlib.sha256()
        for t in (self.prefix.keys, self.prefix.values):
            data.update(t.detach().float().cpu().numpy().tobytes())
        return f"{self.prefix.peft_type}:{self.length}:{data.hexdigest()}"

    def _write(self, slots: list[int], start: int) -> None:
        if not slots or self.prefix is None:  # slots come only with a prefix
            return
        index = torch.tensor(slots, device=self.cache.keys.device)
        end = start + len(slots)
        for cache, source in ((self.cache.keys, self.prefix.keys), (self.cache.values, self.prefix.values)):
            for layer in range(cache.shape[0]):
                store_kv(cache[layer], index, source[layer, start:end].to(cache.device), self.kv_scale)
