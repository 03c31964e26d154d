"""The paged KV cache: keys and values preallocated in fixed-size blocks, one block table per sequence.

All layers' keys live in one tensor ``[layers, blocks * block_size, kv_heads, head_dim]`` (values
likewise), allocated once at load from a memory budget, so serving never allocates cache memory
again and a sequence needs no contiguous room: token ``p`` of a sequence sits in slot
``table[row, p // block_size] * block_size + p % block_size``. The block table is a device tensor
``[max_batch_size, max_blocks_per_sequence]`` indexed by the sequence's *row* (a batch slot it holds
from admission to release), so the decode step reads it on the device and nothing is copied per
step. Block 0 is never handed out, and the table's extra last row points only at it: padded rows
of a captured CUDA graph use that row and write their garbage there.

Admission reserves a request's worst case (prompt plus ``max_tokens``) up front, so a running
request can never run out of cache and the scheduler never preempts one (the paged backend's
``grow`` always succeeds); a request that does not fit waits in the queue until finished requests
free their blocks.

Blocks taken out of the pool with :meth:`PagedKVCache.pin` hold what every sequence starts with (a
prompt-learning adapter's prefix, ``adapters/virtual_tokens.py``): a reservation may begin its
table with them (``lead``), read-only and shared, so each sequence owns only the blocks after them.

Prefix caching (``model/block_pool.py``): a reservation may name the content hashes of its prompt's
full blocks; the longest cached run of them is shared into its table after the lead (the sequence's
prefill starts after them, :meth:`PagedKVCache.hits`), and the rest are published as the prefill
writes them (:meth:`PagedKVCache.commit`). Released blocks with a hash stay cached until evicted.
A request whose next uncached block is being computed by an admitted sequence right now waits for
it (:meth:`PagedKVCache.can_reserve` says no): a burst of requests with one long shared prefix then
prefills it once, not once per request admitted in the same step.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from lmforge.core.errors import ServingError
from lmforge.serving.model.block_pool import BlockPool


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * element


def blocks_for_budget(shape: CacheShape, budget_mb: float) -> int:
    """How many blocks fit in ``budget_mb`` MiB (at least 2: the scratch block and one real one)."""
    blocks = int(budget_mb * 2**20 // shape.bytes_per_block())
    if blocks < 2:
        raise ServingError(
            f"a KV cache of {budget_mb:g} MiB holds no block ({shape.bytes_per_block() / 2**20:.2f} MiB per block)",
            "raise serving.kv_cache.memory_mb or lower serving.kv_cache.block_size",
        )
    return blocks


class PagedKVCache:
    """Block pool plus per-row block tables; owned by the engine thread (not thread-safe)."""

    def __init__(self, shape: CacheShape, num_blocks: int, max_rows: int, max_len: int, device: torch.device):
        self.shape = shape
        self.block_size = shape.block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = math.ceil(max_len / shape.block_size)
        slots = num_blocks * shape.block_size
        dims = (shape.num_layers, slots, shape.kv_heads, shape.head_dim)
        # Zeros, not empty: padded graph rows read block 0, and garbage NaNs there would be noise in logs.
        self.keys = torch.zeros(dims, dtype=shape.dtype, device=device)
        self.values = torch.zeros(dims, dtype=shape.dtype, device=device)
        # One row more than sequences: the last row points only at block 0, for padded graph rows.
        self.table = torch.zeros((max_rows + 1, self.max_blocks_per_seq), dtype=torch.int32, device=device)
        self.scratch_row = max_rows
        self.pool = BlockPool(num_blocks)  # block 0 is the scratch block
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._owned: dict[int, list[int]] = {}  # row -> its blocks after the lead (shared hits, then its own)
        self._hits: dict[int, int] = {}  # row -> cached blocks its table reuses
        # row -> (table index, block, hash) of its full prompt blocks not yet published
        self._pending: dict[int, list[tuple[int, int, bytes]]] = {}
        self._in_flight: Counter[bytes] = Counter()  # hashes of the pending blocks of all rows
        self._pinned = 0  # blocks taken out of the pool for good (shared prefixes)

    # ------------------------------------------------------------ capacity

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1 - self._pinned

    def blocks_needed(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def fits_ever(self, tokens: int, lead: int = 0) -> bool:
        """Whether a sequence of ``tokens`` (the first ``lead`` blocks shared) could be admitted into an empty cache."""
        need = self.blocks_needed(tokens)
        return need <= self.max_blocks_per_seq and need - lead <= self.usable_blocks

    def can_reserve(self, tokens: int, lead: int = 0, hashes: list[bytes] | None = None) -> bool:
        """Whether :meth:`reserve` with the same arguments would succeed now."""
        if not self._free_rows:
            return False
        hashes = hashes or []
        hits = self.pool.lookup(hashes)
        if len(hits) < len(hashes) and self._in_flight[hashes[len(hits)]]:
            return False  # its next block is being computed by another sequence: reuse it next step
        return self.blocks_needed(tokens) - lead - len(hits) <= self.pool.available - self.pool.idle(hits)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by admitted sequences (cached idle blocks count as free)."""
        return 1.0 - self.pool.available / self.usable_blocks

    @property
    def rows_in_use(self) -> int:
        return len(self._owned)

    # ------------------------------------------------------------ reserve / release

    def reserve(self, tokens: int, lead: list[int] | None = None, hashes: list[bytes] | None = None) -> int:
        """Reserve blocks for ``tokens`` and a row; returns the row. Call :meth:`can_reserve` first.
        ``lead``: pinned blocks the sequence's table starts with (they hold its first positions).
        ``hashes``: content hashes of the full prompt blocks after the lead (empty: no prefix caching)."""
        lead, hashes = lead or [], hashes or []
        if not self.can_reserve(tokens, len(lead), hashes):
            raise ServingError(f"no room for {tokens} tokens in the KV cache", "call can_reserve() first")
        hits = self.pool.lookup(hashes)
        self.pool.share(hits)
        blocks = hits + self.pool.take(self.blocks_needed(tokens) - len(lead) - len(hits))
        row = self._free_rows.pop()
        self._owned[row], self._hits[row] = blocks, len(hits)
        self._pending[row] = [(len(lead) + i, blocks[i], h) for i, h in enumerate(hashes) if i >= len(hits)]
        self._in_flight.update(h for _, _, h in self._pending[row])
        entry = torch.zeros(self.max_blocks_per_seq, dtype=torch.int32)
        entry[: len(lead) + len(blocks)] = torch.tensor(lead + blocks, dtype=torch.int32)
        self.table[row].copy_(entry)
        return row

    def hits(self, row: int) -> int:
        """Blocks of ``row``'s table after its lead that were already cached at reservation."""
        return self._hits.get(row, 0)

    def commit(self, row: int, written: int) -> None:
        """Positions ``0..written-1`` of ``row`` now hold their keys and values: publish its full blocks among them."""
        pending = self._pending.get(row)
        if not pending:
            return
        done = written // self.block_size  # table entries wholly written
        while pending and pending[0][0] < done:
            _, block, h = pending.pop(0)
            self.pool.publish(block, h)
            self._landed(h)

    def pin(self, n: int) -> list[int]:
        """Take ``n`` blocks out of the pool for good (content shared by every sequence)."""
        if n > len(self.pool.free) - 1:
            raise ServingError(f"the KV cache has {self.num_blocks} blocks, too few to keep {n} for a shared prefix "
                               "and serve", "raise serving.kv_cache.memory_mb")
        self._pinned += n
        return [self.pool.free.pop() for _ in range(n)]

    def release(self, row: int) -> None:
        blocks = self._owned.pop(row, None)
        if blocks is None:
            return
        self._hits.pop(row, None)
        for _, _, h in self._pending.pop(row, []):
            self._landed(h)
        self.pool.release(blocks)
        self._free_rows.append(row)

    def _landed(self, h: bytes) -> None:
        """One pending block with hash ``h`` was written or given up (zero counts are dropped: no growth)."""
        if self._in_flight[h] <= 1:
            del self._in_flight[h]
        else:
            self._in_flight[h] -= 1

    def slots(self, row: int, start: int, end: int) -> list[int]:
        """Cache slots of positions ``start..end-1`` of the sequence in ``row`` (host-side)."""
        blocks = self.table[row].tolist()
        return [blocks[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
