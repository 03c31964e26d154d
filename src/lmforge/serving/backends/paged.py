"""The paged backend: :class:`LlamaRunner` over a :class:`PagedKVCache`, decode steps as CUDA graphs.

On CUDA with a bf16/fp16 model and Triton importable, the layer's small ops are the fused Triton
kernels and decode steps replay captured graphs; elsewhere (CPU, float32) the same runner uses the
PyTorch ops, eagerly. A lone prompt's short prefill chunk replays a captured graph too
(``model/prefill_graphs.py``); other prefill chunks run eagerly (their shapes vary).

Prefix caching (``serving.kv_cache.prefix_caching``, ``model/block_pool.py``): a request's prompt
blocks are hashed from a root that holds its LoRA adapter, the prompt-learning prefix and the KV
storage, and the cached ones, and those another admitted request is about to write, are reused
(``model/kv_cache.py``); its prefill then starts at an offset, which is the chunked-prefill path
(a query block at any position attends to the cache before it), eager or captured alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.adapters.runtime import AdapterPool, make_pool
from lmforge.serving.adapters.virtual_tokens import PagedPrefix, prefix_of
from lmforge.serving.backends.base import BackendLost, PrefillItem
from lmforge.serving.model.block_pool import chain_hashes, root_hash
from lmforge.serving.model.graphs import DecodeGraphs
from lmforge.serving.model.kv_cache import CacheShape, PagedKVCache, blocks_for_budget
from lmforge.serving.model.ops import Ops, StepLayout, TritonOps
from lmforge.serving.model.prefill_graphs import PrefillGraphs, prefill_buckets
from lmforge.serving.model.runner import LlamaRunner, head_dim
from lmforge.serving.model.tensor_parallel import TensorParallel, drop_whole_layers, shard
from lmforge.serving.model.types import LlamaCausalLM
from lmforge.serving.model.verify_graphs import VerifyGraphs
from lmforge.serving.quant.quantize import check_options, kv_cache_dtype

log = logging.getLogger(__name__)

_CPU_DEFAULT_MAX_MB = 1024.0
_CUDA_FREE_FRACTION = 0.5


def pick_ops(device: torch.device, dtype: torch.dtype, fused_attention: bool = True) -> Ops:
    """Triton kernels on CUDA for half-precision models, the PyTorch ops otherwise."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return Ops()
    try:
        return TritonOps(rope_in_attention=fused_attention)
    except ImportError:
        log.warning("triton is not installed: the paged engine runs PyTorch ops, without CUDA graphs")
        return Ops()


class PagedBackend:
    """Our Llama runner over a paged KV cache; the backend the engine prefers (see ``backends/base.py``)."""

    name = "paged"
    chunked_prefill = True
    overlap = True  # the engine may launch a decode step before handling the previous one's text
    reserves_worst_case = True  # admission takes the blocks of prompt plus max_tokens (model/kv_cache.py)

    def __init__(self, model: LlamaCausalLM, cfg: ServingConfig, max_len: int, ops: Ops | None = None,
                 tp: TensorParallel | None = None) -> None:
        """``tp``: this backend is one rank of a tensor-parallel group (``backends/tensor_parallel.py``), and
        holds that rank's slice of every layer and of the KV cache's heads."""
        config = model.config
        weight = model.get_input_embeddings().weight
        self.device, dtype = weight.device, weight.dtype
        check_options("none", cfg.kv_cache.dtype, str(self.device))  # fp8 cache: CPU, or CUDA >= 8.9
        kv_heads = (config.num_key_value_heads or config.num_attention_heads) // (tp.world if tp else 1)
        shape = CacheShape(config.num_hidden_layers, kv_heads, head_dim(config), cfg.kv_cache.block_size,
                           kv_cache_dtype(cfg.kv_cache.dtype, dtype))
        budget = cfg.kv_cache.memory_mb or self._default_budget_mb(shape, cfg.scheduler.max_batch_size, max_len)
        blocks = blocks_for_budget(shape, budget)
        if tp is not None:  # the ranks' allocators make the same choices only over the same number of blocks
            blocks = tp.smallest(blocks, self.device)
        self.cache = PagedKVCache(shape, blocks, cfg.scheduler.max_batch_size, max_len, self.device)
        self.ops = ops or pick_ops(self.device, dtype, cfg.runtime.fused_attention)
        self.runner = LlamaRunner(model, self.cache, self.ops, max_len)
        if tp is not None:
            shard(self.runner, model, tp)
            drop_whole_layers(model)
        # Unmerged LoRA adapters chosen per request, at start-up or loaded while serving (adapters/runtime.py);
        # attached before capture. adapter_slots is the pool's live name -> id map.
        self.lora: AdapterPool | None = make_pool(cfg, model, self.runner)
        self.adapter_slots: dict[str, int] = self.lora.ids if self.lora is not None else {}
        # A prompt-learning adapter's prefix fills every sequence's first positions (adapters/virtual_tokens.py).
        self.prefix = PagedPrefix(prefix_of(model), self.cache, self.ops.kv_scale)
        self.virtual_tokens = self.prefix.length
        if self.virtual_tokens and shape.dtype == torch.float8_e4m3fn:
            # Measured on an H100 (python -m bench.serve.gpu_check): prefix keys are ~4x larger than ordinary
            # ones, and with fp8 storage (one scale) the logits moved 11-32% (rel. L2) against a bf16 cache,
            # 1-4% without a prefix. Refused until scales calibrated on the virtual tokens are measured to hold.
            raise ServingError(f"an fp8 KV cache (serving.kv_cache.dtype: fp8) cannot hold this model's "
                               f"{self.virtual_tokens}-token prompt-learning prefix without a large quality loss "
                               "(logits 11-32% off)", "set serving.kv_cache.dtype: bf16 (or auto) for this model")
        group = self.runner.heads // self.runner.kv_heads
        # A prefill query block holds up to 128 (token, head) rows of the attention kernel.
        self.prefill_block = max(1, 128 // group)
        self.prefix_caching = cfg.kv_cache.prefix_caching
        # Everything besides the tokens that a block's keys and values depend on; per LoRA adapter load below.
        self._root = root_hash("kv", str(shape.dtype), self.ops.kv_scale, shape.block_size, self.prefix.digest)
        self._last_hashes: tuple[tuple[bytes, tuple[int, ...]] | None, list[bytes]] = (None, [])  # (root, prompt), hashes
        self.graphs = None
        self.prefill_graphs: PrefillGraphs | None = None
        if cfg.runtime.cuda_graphs and self.device.type == "cuda" and isinstance(self.ops, TritonOps):
            self.graphs = DecodeGraphs(self.runner, cfg.scheduler.max_batch_size)
            # A lone prompt's short prefill too (model/prefill_graphs.py): launched eagerly, it is host-bound.
            buckets = prefill_buckets(min(cfg.scheduler.max_prefill_tokens, max_len))
            if buckets:
                self.prefill_graphs = PrefillGraphs(self.runner, self.prefill_block, buckets)
        # Speculative decoding's verify forward (k + 1 tokens per sequence) as graphs too (model/verify_graphs.py),
        # when one query block of the attention kernel holds them (up to 128 (token, head) rows, as in prefill).
        self.verify_graphs: VerifyGraphs | None = None
        width = cfg.speculative.num_tokens + 1
        if self.graphs is not None and cfg.speculative.method != "none":
            if width <= self.prefill_block:
                self.verify_graphs = VerifyGraphs(self.runner, cfg.scheduler.max_batch_size, width)
            else:
                log.info("speculative verify runs eagerly: %d tokens per sequence exceed one attention block of %d",
                         width, self.prefill_block)
        log.info("paged KV cache: %d blocks of %d tokens (%.0f MiB), ops=%s, cuda_graphs=%s, prefill graphs up to %s "
                 "tokens, rope in attention=%s", self.cache.num_blocks, shape.block_size,
                 self.cache.num_blocks * shape.bytes_per_block() / 2**20, self.ops.name, self.graphs is not None,
                 self.prefill_graphs.batch.buckets[-1] if self.prefill_graphs is not None else None,
                 getattr(self.ops, "rope_in_attention", False))

    def _default_budget_mb(self, shape: CacheShape, max_rows: int, max_len: int) -> float:
        useful = (max_rows * -(-max_len // shape.block_size) + 1) * shape.bytes_per_block() / 2**20
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return max(1.0, min(useful, free * _CUDA_FREE_FRACTION / 2**20))
        return min(useful, _CPU_DEFAULT_MAX_MB)

    # ------------------------------------------------------------ capacity

    def fits_ever(self, tokens: int) -> bool:
        return self.prefix.fits_ever(tokens)

    def can_reserve(self, tokens: int, prompt: Sequence[int] = (), adapter: int = 0) -> bool:
        if self.lora is not None and not self.lora.can_place(adapter):
            return False  # every LoRA slot is busy with running sequences: wait for one (adapters/runtime.py)
        return self.prefix.can_reserve(tokens, self._hashes(prompt, adapter))

    def reserve(self, tokens: int, prompt: Sequence[int] = (), adapter: int = 0) -> int:
        return self.prefix.reserve(tokens, self._hashes(prompt, adapter))

    def cached_tokens(self, row: int) -> int:
        hits = self.cache.hits(row)  # shrinks if a writer it borrowed from left first (model/kv_cache.py)
        # The shared blocks follow the prefix's whole blocks and cover positions up to their end.
        return (len(self.prefix.shared) + hits) * self.cache.block_size - self.virtual_tokens if hits else 0

    def prefill_waits(self, row: int) -> list[tuple[int, int]]:
        shift = self.virtual_tokens  # the cache counts positions from the prefix's first, the engine from the prompt's
        return [(writer, end - shift) for writer, end in self.cache.waits(row)]

    def _hashes(self, prompt: Sequence[int], adapter: int) -> list[bytes]:
        """Content hashes of the full blocks of ``prompt`` but its last token (always recomputed: its
        logits choose the first token), on the chain of ``adapter``'s root."""
        if not self.prefix_caching or len(prompt) < 2:
            return []
        size = self.cache.block_size
        first = size - self.virtual_tokens % size  # the prefix's partial block fills the start of the first
        # An adapter's chain starts from its load's identity, never reused: no block of other weights is met.
        root = root_hash(self._root, self.lora.identity(adapter)) if adapter and self.lora is not None else self._root
        key = (root, tuple(prompt))
        if self._last_hashes[0] != key:  # admission asks can_reserve, then reserve: hash a long prompt once
            self._last_hashes = (key, chain_hashes(root, prompt[:-1], first, size))
        return self._last_hashes[1]

    def grow(self, row: int, tokens: int) -> bool:
        return True  # admission reserved the sequence's worst case

    def release(self, row: int) -> None:
        self.cache.release(row)
        if self.lora is not None:
            self.lora.release_row(row)

    def set_adapter(self, row: int, slot: int) -> None:
        """Decode ``row`` with LoRA adapter ``slot`` (an id of ``adapter_slots``; 0: the plain base)."""
        if self.lora is not None:
            self.lora.place_row(row, slot)
        elif slot:
            raise ServingError(f"adapter slot {slot} asked for, but no LoRA adapters are served",
                               "name the adapters in serving.adapters (lmforge serve BASE --adapter NAME=DIR)")

    @property
    def cache_usage(self) -> float:
        return self.cache.usage

    def lost(self) -> BackendLost | None:
        return None  # one process: a failure fails its step, not the backend

    def close(self) -> None:
        """Nothing to stop: the cache and graphs go with the object."""

    # ------------------------------------------------------------ forward passes

    def prefill(self, items: list[PrefillItem]) -> list[torch.Tensor]:
        shift = self.virtual_tokens  # the engine counts positions from the prompt's first token
        lone = items[0] if len(items) == 1 and not items[0].all_logits else None
        if self.prefill_graphs is not None and lone is not None and self.prefill_graphs.fits(len(lone.ids)):
            # A view of the graph's output (valid until its next replay): the engine copies the rows it keeps.
            logits = [self.prefill_graphs.run(lone.row, shift + lone.start, lone.ids)]
        else:
            logits = self._prefill_eagerly(items, shift)
        for item in items:  # their blocks are written now (same stream): reusable by later requests
            self.cache.commit(item.row, shift + item.start + len(item.ids))
        return logits

    def _prefill_eagerly(self, items: list[PrefillItem], shift: int) -> list[torch.Tensor]:
        wanted: list[int] = []
        sizes: list[int] = []
        first = 0
        for item in items:
            n = len(item.ids)
            wanted.extend(range(first, first + n) if item.all_logits else [first + n - 1])
            sizes.append(n if item.all_logits else 1)
            first += n
        layout = StepLayout.build([(i.row, shift + i.start, i.ids) for i in items], self.device, self.prefill_block,
                                  wanted)
        return list(self.runner.forward(layout).split(sizes))

    def verify(self, rows: list[int], positions: list[int], runs: list[list[int]]) -> list[torch.Tensor]:
        """Logits of every token of each ``runs[i]``, fed from ``positions[i]`` on in ``rows[i]``: one
        forward for speculative decoding's up to k + 1 positions per sequence (``engine/speculative.py``).
        A captured graph's replay where captured (``model/verify_graphs.py``: its output is valid until
        the next verify), else eagerly, over a layout of query blocks of up to ``prefill_block`` tokens (a
        decode step's layout when every run fits one block). Nothing is committed to the prefix
        cache: only prompt blocks are ever hashed, and these are generated."""
        shift = self.virtual_tokens
        if self.verify_graphs is not None and self.verify_graphs.fits(runs):
            return self.verify_graphs.run(rows, [shift + p for p in positions], runs)
        layout = StepLayout.build([(r, shift + p, ids) for r, p, ids in zip(rows, positions, runs)], self.device,
                                  self.prefill_block, None, decode=True)
        return list(self.runner.forward(layout).split([len(ids) for ids in runs]))

    def decode(self, rows: list[int], positions: list[int], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        if self.virtual_tokens:
            positions = [self.virtual_tokens + p for p in positions]
        if self.graphs is not None and self.graphs.fits(len(rows)):
            return self.graphs.run(tokens, positions, rows)
        ids = [0] * len(rows) if isinstance(tokens, torch.Tensor) else tokens
        layout = StepLayout.build([(r, p, [t]) for r, p, t in zip(rows, positions, ids)], self.device, 1, None,
                                  decode=True)
        if isinstance(tokens, torch.Tensor):  # still on the device: fed in stream order, not read here
            layout = dataclasses.replace(layout, tokens=tokens)
        return self.runner.forward(layout)
