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

Blocks still being written are shared too (*borrowed*): a reservation whose chain goes on into
blocks that an admitted sequence (the *writer*) has reserved but not yet written maps those same
blocks, so a burst of requests with one new long prefix prefills it once, and their suffixes can
run in the very forward that writes it (the runner stores every token's keys and values before any
attention reads the cache, layer by layer: ``model/runner.py``). A borrower's prefill may run only
in a forward that brings each writer past the borrowed blocks (:meth:`PagedKVCache.waits`; the
scheduler checks it), so it never reads an unwritten block. A writer that leaves before writing
them (cancelled, failed, preempted) hands them to its earliest borrower, which has run nothing yet
(by that rule) and now writes them itself: its prefill starts back at them (:meth:`PagedKVCache.hits`
shrinks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.core.errors import ServingError
from lmforge.serving.model.block_pool import BlockPool
from lmforge.serving.model.transfer import to_device


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
        self._owned: dict[int, list[int]] = {}  # row -> its blocks after the lead (shared ones, then its own)
        self._entries: dict[int, list[int]] = {}  # row -> its table entry (lead, then owned), kept on the host
        self._shared: dict[int, int] = {}  # row -> blocks after its lead that it did not compute (cached or borrowed)
        # row -> (table index, block, hash) of the full prompt blocks it writes and has not written yet
        self._pending: dict[int, list[tuple[int, int, bytes]]] = {}
        self._writer: dict[bytes, tuple[int, int, int]] = {}  # pending hash -> (writing row, table index, block)
        self._borrowed: dict[int, dict[bytes, tuple[int, int]]] = {}  # row -> unwritten shared hash -> (index, block)
        self._readers: dict[bytes, list[int]] = {}  # pending hash -> rows borrowing it, in reservation order
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
        hits, borrowed = self._match(hashes or [])
        # Borrowed blocks are held by their writer: taking them costs no available block.
        return self.blocks_needed(tokens) - lead - len(hits) - len(borrowed) <= self.pool.available - self.pool.idle(hits)

    def _match(self, hashes: list[bytes]) -> tuple[list[int], list[tuple[bytes, int]]]:
        """The cached blocks of the longest run of ``hashes``, then the (hash, block) of those after it
        that admitted sequences are writing (a chain's blocks are written in order, so that run stops
        at the first block nobody has or writes)."""
        hits = self.pool.lookup(hashes)
        borrowed: list[tuple[bytes, int]] = []
        for h in hashes[len(hits):]:
            writing = self._writer.get(h)
            if writing is None:
                break
            borrowed.append((h, writing[2]))
        return hits, borrowed

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
        hits, borrowed = self._match(hashes)
        shared = hits + [block for _, block in borrowed]
        self.pool.share(shared)
        blocks = shared + self.pool.take(self.blocks_needed(tokens) - len(lead) - len(shared))
        row = self._free_rows.pop()
        self._owned[row], self._shared[row] = blocks, len(shared)
        first = len(lead) + len(hits)  # table index of the first borrowed block
        self._borrowed[row] = {h: (first + i, block) for i, (h, block) in enumerate(borrowed)}
        for h in self._borrowed[row]:
            self._readers.setdefault(h, []).append(row)
        self._pending[row] = []
        for i in range(len(shared), len(hashes)):
            index, h = len(lead) + i, hashes[i]
            if h not in self._writer:  # else another row writes the same content (a race): this copy stays private
                self._writer[h] = (row, index, blocks[i])
                self._pending[row].append((index, blocks[i], h))
        # Written without waiting for the device's queued work (a plain copy from the host would synchronize
        # the stream, stalling a decode step launched ahead at every admission).
        self._entries[row] = lead + blocks
        entry = lead + blocks + [0] * (self.max_blocks_per_seq - len(lead) - len(blocks))
        self.table[row].copy_(to_device(entry, torch.int32, self.table.device))
        return row

    def hits(self, row: int) -> int:
        """Blocks of ``row``'s table after its lead that it does not compute: cached at reservation, or
        borrowed from a writer (fewer once a writer that left handed its blocks to ``row``)."""
        return self._shared.get(row, 0)

    def waits(self, row: int) -> list[tuple[int, int]]:
        """(writer row, cache positions) pairs: ``row``'s prefill may run only in a forward after which
        each writer has written its first that many positions (empty: it may run now)."""
        need: dict[int, int] = {}
        for h, (index, _) in self._borrowed.get(row, {}).items():
            writer = self._writer[h][0]
            need[writer] = max(need.get(writer, 0), (index + 1) * self.block_size)
        return list(need.items())

    def commit(self, row: int, written: int) -> None:
        """Positions ``0..written-1`` of ``row`` now hold their keys and values: publish its full blocks among them."""
        pending = self._pending.get(row)
        if not pending:
            return
        done = written // self.block_size  # table entries wholly written
        while pending and pending[0][0] < done:
            _, block, h = pending.pop(0)
            self.pool.publish(block, h)
            del self._writer[h]
            for reader in self._readers.pop(h, []):
                del self._borrowed[reader][h]

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
        del self._entries[row]
        self._shared.pop(row, None)
        for h in self._borrowed.pop(row, {}):
            self._unread(h, row)
        self._hand_over(row, self._pending.pop(row, []))
        self.pool.release(blocks)
        self._free_rows.append(row)

    def _hand_over(self, row: int, unwritten: list[tuple[int, int, bytes]]) -> None:
        """``row`` leaves without writing ``unwritten``: the earliest borrower of each such block writes it
        instead, with the writer's later blocks it borrowed too (borrowers run only in or after the forward
        that writes what they borrow, so it has run nothing yet); a block nobody borrows is dropped."""
        for index, _, h in unwritten:
            if self._writer[h][0] != row:
                continue  # handed over with an earlier block
            readers = self._readers.get(h)
            if not readers:
                del self._writer[h]
                continue
            heir = readers[0]
            borrowed = self._borrowed[heir]
            # Its borrowed blocks from here on are all this writer's: another writer of them would have borrowed h.
            moved = [(i, block, g) for g, (i, block) in borrowed.items() if i >= index]
            for i, block, g in moved:
                del borrowed[g]
                self._writer[g] = (heir, i, block)
                self._unread(g, heir)
            self._pending[heir] = moved + self._pending[heir]
            self._shared[heir] -= len(moved)

    def _unread(self, h: bytes, row: int) -> None:
        readers = self._readers[h]
        readers.remove(row)
        if not readers:
            del self._readers[h]

    def slots(self, row: int, start: int, end: int) -> list[int]:
        """Cache slots of positions ``start..end-1`` of the sequence in ``row`` (host-side)."""
        blocks = self._entries[row]
        return [blocks[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
