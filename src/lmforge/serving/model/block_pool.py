"""The paged KV cache's block pool: reference-counted blocks, and full blocks cached by content (prefix caching).

A block is *held* while a sequence's block table points at it (its reference count is how many
do), *free* when nothing is in it worth keeping, and *evictable* when no sequence holds it but it
still holds a full block of some prompt that a later request may reuse. Allocation takes free
blocks first, then evicts the least recently released evictable ones, so cached content costs no
capacity: the cache is kept only while nobody needs the room.

Content identity is a chain of hashes (:func:`chain_hashes`, vLLM's automatic prefix caching): the
hash of block ``i`` covers the hash of block ``i-1`` and block ``i``'s token ids, so equal hashes
mean equal whole prefixes, and the chain starts from a *root* that holds everything else the keys
and values depend on (the LoRA adapter, a prompt-learning adapter's virtual tokens, the KV dtype:
``backends/paged.py`` builds it), so sequences of different adapters never share a block. The hash
is SHA-256: a client who could forge a collision could read another client's cached prompt.

A held block with a hash is shared read-only: a sequence reuses only blocks before its last prompt
token (that token is always recomputed, for the logits of the first sampled token), so it never
writes into a block it did not allocate. Owned by the engine thread (not thread-safe).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def root_hash(*parts: object) -> bytes:
    """The chain's root for sequences whose cache content also depends on ``parts`` (reprs are hashed)."""
    return hashlib.sha256(repr(parts).encode()).digest()


def chain_hashes(root: bytes, tokens: Sequence[int], first: int, block_size: int) -> list[bytes]:
    """Hashes of the *full* blocks of ``tokens``: the first block holds ``first`` of them (fewer than
    ``block_size`` when virtual tokens fill its start), every later one ``block_size``."""
    ids = array("q", tokens)
    data, width = ids.tobytes(), ids.itemsize  # converted once: per block it cost a fifth of the time
    hashes: list[bytes] = []
    previous, start, size = root, 0, first
    while size > 0 and start + size <= len(tokens):
        previous = hashlib.sha256(previous + data[start * width : (start + size) * width]).digest()
        hashes.append(previous)
        start, size = start + size, block_size
    return hashes


class BlockPool:
    """Blocks ``first..num_blocks-1``: reference counts, the hash index and the LRU of evictable blocks."""

    def __init__(self, num_blocks: int, first: int = 1) -> None:
        self.free: list[int] = list(range(num_blocks - 1, first - 1, -1))  # popped from the end: low ids first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # released cached blocks, least recent first
        self.refs: dict[int, int] = {}  # held block -> sequences holding it
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictions = 0

    @property
    def available(self) -> int:
        """Blocks an allocation may take (free ones, then evicted cached ones)."""
        return len(self.free) + len(self.evictable)

    @property
    def cached_blocks(self) -> int:
        return len(self.hash_of)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached run of ``hashes`` from its start."""
        found: list[int] = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def idle(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` no sequence holds (reusing them takes them out of :attr:`available`)."""
        return sum(1 for b in blocks if b not in self.refs)

    def take(self, n: int) -> list[int]:
        """``n`` blocks for a sequence's own content (the caller checked :attr:`available`)."""
        out: list[int] = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:  # evict the least recently released cached block
                block, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of.pop(block)]
                self.evictions += 1
            self.refs[block] = 1
            out.append(block)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """Hold cached ``blocks`` for one more sequence."""
        for block in blocks:
            self.evictable.pop(block, None)
            self.refs[block] = self.refs.get(block, 0) + 1

    def publish(self, block: int, h: bytes) -> None:
        """Index the now fully written held ``block`` under ``h`` (no-op if another block already has ``h``:
        two sequences computed the same prefix at once, and the later copy stays private)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one hold on each of ``blocks`` (a sequence's, in table order)."""
        # Reversed: a chain's later blocks become evictable first, so its start, shared the most, lasts longest.
        for block in reversed(blocks):
            refs = self.refs[block] - 1
            if refs:
                self.refs[block] = refs
                continue
            del self.refs[block]
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def reset(self) -> None:
        """Forget every cached block that no sequence holds (they become free)."""
        for block in self.evictable:
            del self.by_hash[self.hash_of.pop(block)]
            self.free.append(block)
        self.evictable.clear()
