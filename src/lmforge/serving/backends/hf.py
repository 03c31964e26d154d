"""The HF backend: rows decoded together over the model's own dense, left-padded KV cache.

Continuous batching needs four operations on the KV cache, and :class:`DecodeBatch` is exactly
those: ``prefill`` new prompts into a fresh batch, ``merge`` that batch into the running one at a
step boundary, ``decode`` one token for every row, and ``keep`` only the unfinished rows. Keys and
values live in the model's own ``DynamicCache`` ([rows, kv_heads, columns, head_dim] per layer), so
rows of different lengths share columns through left padding and a 2-D attention mask, and
position ids are tracked per row. :class:`HFBackend` wraps it for the engine; it serves every
causal LM the paged backend (``backends/paged.py``) does not run, through the model's own forward
(``model/hf_forward.py``), and ONNX Runtime's exported step the same way (``backends/onnx.py``).

Invariant: every layer's cache holds exactly ``mask.shape[1]`` columns.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lmforge.core.errors import ServingError
from lmforge.serving.adapters.virtual_tokens import VirtualPrefix, prefix_of
from lmforge.serving.backends.base import BackendLost, PrefillItem
from lmforge.serving.model.hf_forward import hf_forward
from lmforge.serving.model.types import FilledCacheLayer, ServedModel


def check_cache_support(model: ServedModel) -> None:
    """Refuse models whose cache layers this batch cannot pad and merge (e.g. sliding windows)."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise ServingError(
            f"this engine merges only full-attention KV caches; the model uses {sorted(kinds)}",
            "serve a model without sliding-window or hybrid attention layers (e.g. Llama, GPT-2)",
        )


class DecodeBatch:
    """Rows that share one KV cache. Row order is the caller's; ``keep`` and ``merge`` preserve it."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [rows, columns] long; 1 where the column holds one of the row's tokens
        self.positions = positions  # [rows] position id of each row's next token

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @classmethod
    def prefill(cls, model: ServedModel, prompts: list[list[int]], pad_id: int, all_columns: bool = False,
                prefix: VirtualPrefix | None = None) -> tuple[DecodeBatch, torch.Tensor]:
        """Run the prompts (left-padded to one length) and return the batch and last-token logits
        (``all_columns``: logits of every column, ``[rows, width, vocab]``). With ``prefix`` (a
        prompt-learning adapter's, ``adapters/virtual_tokens.py``) every row's cache starts with it."""
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
            mask[row, width - len(prompt) :] = 1
        cache = DynamicCache(config=model.config)
        if prefix is not None:  # columns [prefix | padding | prompt]: the mask skips the padding
            mask = torch.cat([mask.new_ones(len(prompts), prefix.length), mask], dim=1)
            for i, (keys, values) in enumerate(zip(prefix.keys, prefix.values)):
                rows = (len(prompts), -1, -1, -1)
                cache.update(keys.transpose(0, 1)[None].expand(rows), values.transpose(0, 1)[None].expand(rows), i)
        # Padding must not shift positions: each row's first real token is position 0 (P after a prefix).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = hf_forward(model, ids, mask, positions[:, -width:], cache, all_columns)
        return cls(cache, mask, mask.sum(-1)), logits

    def decode(self, model: ServedModel, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([rows]) and return the logits for the next one ([rows, vocab])."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = hf_forward(model, tokens[:, None], self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        return logits

    def merge(self, other: DecodeBatch) -> None:
        """Append ``other``'s rows after ours, left-padding whichever side is narrower."""
        width = max(self.width, other.width)
        # Both batches were prefilled, so every layer is filled (and a DynamicLayer: check_cache_support).
        for mine, theirs in zip(cast(list[FilledCacheLayer], self.cache.layers),
                                cast(list[FilledCacheLayer], other.cache.layers)):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop columns no remaining row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        used = self.mask.any(dim=0).nonzero()
        # Without trimming, a server that is never idle would grow the padded width forever.
        first = int(used[0].item()) if used.numel() else self.width
        self.mask = self.mask[:, first:]
        for layer in cast(list[FilledCacheLayer], self.cache.layers):  # DynamicLayers (check_cache_support)
            if layer.is_initialized:
                layer.keys = layer.keys[index, :, first:]
                layer.values = layer.values[index, :, first:]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad dimension ``dim`` of ``t`` (either 1 of a mask or 2 of a cache tensor) on the left."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]
    return F.pad(t, pad)


class HFBackend:
    """The fallback backend: any causal LM's own forward over a :class:`DecodeBatch`.

    Rows are the engine's sequences in admission order; a prefill appends its rows after the
    running ones (as the engine appends them to its running list), and a decode keeps only the
    rows it is given. Capacity is ``max_batch_size`` rows; prefill takes whole prompts.
    """

    chunked_prefill = False
    overlap = False  # a decode keeps only the rows it is given: a second decode in one step would drop the first's
    reserves_worst_case = True  # a row is all it reserves; the dense cache grows with the batch

    def __init__(self, model: ServedModel, max_batch_size: int, name: str = "hf") -> None:
        check_cache_support(model)
        self.name = name
        self.model = model
        self.adapter_slots: dict[str, int] = {}  # unmerged LoRA adapters need the paged backend
        self.max_rows = max_batch_size
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._batch: DecodeBatch | None = None
        self._order: list[int] = []  # row id of each batch row
        self._live: set[int] = set()
        self._next_row = 0
        self._pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.prefix = prefix_of(model)
        self.virtual_tokens = self.prefix.length if self.prefix is not None else 0

    def fits_ever(self, tokens: int) -> bool:
        return self.context_window <= 0 or self.virtual_tokens + tokens <= self.context_window

    def can_reserve(self, tokens: int, prompt: Seq[int] = (), adapter: int = 0) -> bool:
        return len(self._live) < self.max_rows

    def reserve(self, tokens: int, prompt: Seq[int] = (), adapter: int = 0) -> int:
        self._next_row += 1
        self._live.add(self._next_row)
        return self._next_row

    def cached_tokens(self, row: int) -> int:
        return 0  # a dense cache per batch: no prefix caching

    def prefill_waits(self, row: int) -> list[tuple[int, int]]:
        return []  # no prefix caching: no row shares another's blocks

    def grow(self, row: int, tokens: int) -> bool:
        return True

    def release(self, row: int) -> None:
        self._live.discard(row)

    def set_adapter(self, row: int, slot: int) -> None:
        if slot:
            raise ServingError("the HF backend serves the base model only",
                               "serve LoRA adapters unmerged with the paged engine (serving.runtime.engine: auto)")

    @property
    def cache_usage(self) -> float:
        return len(self._live) / self.max_rows

    def lost(self) -> BackendLost | None:
        return None  # one process: a failure fails its step, not the backend

    def close(self) -> None:
        """Nothing to stop: the caches go with the object."""

    def _keep(self, rows: list[int]) -> None:
        """Reduce the batch to ``rows`` (a subsequence of the current order)."""
        if rows == self._order or self._batch is None:
            return
        if not rows:
            self._batch, self._order = None, []
            return
        index = {row: i for i, row in enumerate(self._order)}
        self._batch.keep([index[row] for row in rows])
        self._order = list(rows)

    def prefill(self, items: list[PrefillItem]) -> list[torch.Tensor]:
        self._keep([row for row in self._order if row in self._live])
        all_columns = any(item.all_logits for item in items)
        fresh, logits = DecodeBatch.prefill(self.model, [item.ids for item in items], self._pad, all_columns,
                                            self.prefix)
        if self._batch is None:
            self._batch, self._order = fresh, [item.row for item in items]
        else:
            self._batch.merge(fresh)
            self._order += [item.row for item in items]
        if not all_columns:
            return list(logits.split(1))
        return [logits[i, -len(item.ids):] if item.all_logits else logits[i, -1:] for i, item in enumerate(items)]

    def decode(self, rows: list[int], positions: list[int], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        self._keep(rows)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.model.device)
        batch = cast(DecodeBatch, self._batch)  # the rows decoded are running: their prefill made the batch
        return batch.decode(self.model, ids)
