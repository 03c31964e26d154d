"""Deduplication: exact (normalized-text hash) and near-duplicate (MinHash + LSH), across all shards
and against earlier dataset versions kept in the workspace.

Signatures are computed per document while shards stream (:class:`MinHasher`); the corpus-wide part
(:func:`find_duplicates`) works on arrays only: per LSH band, sort the band hashes and link each
document to the first one of its bucket, verify each candidate pair on its estimated Jaccard
similarity, then union-find. Memory is a few bytes per document per band, and signatures may be a
memory-mapped file, so corpora larger than memory fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.config.curation import NearDedupConfig
from lmforge.core.workspace import atomic_write_json
from lmforge.curation.text import ngram_hashes

KEEP, EXACT, NEAR, NEAR_PREVIOUS = 0, 1, 2, 3
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate", NEAR_PREVIOUS: "near_duplicate_previous_version"}
_EMPTY = np.uint32(0xFFFFFFFF)
_CHUNK = 4096


class MinHasher:
    """MinHash signatures of word shingles with multiply-shift hashing (one (a, b) per permutation)."""

    def __init__(self, cfg: NearDedupConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        self.a = rng.integers(1, 2**63, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
        self.shingle_size = cfg.shingle_size

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        # A document shorter than one shingle is one shingle of all its words.
        shingles = ngram_hashes(hashes, min(self.shingle_size, len(hashes)) or 1)
        out = np.full(len(self.a), _EMPTY, dtype=np.uint32)
        if not len(shingles):
            return out
        shingles = np.unique(shingles)
        for lo in range(0, len(shingles), _CHUNK):
            block = shingles[lo: lo + _CHUNK, None] * self.a + self.b  # wraps mod 2**64
            np.minimum(out, (block >> np.uint64(32)).min(axis=0).astype(np.uint32), out=out)
        return out


def lsh_params(cfg: NearDedupConfig) -> tuple[int, int]:
    """(bands, rows) from config, or the pair minimizing 0.1 false positives + 0.9 false negatives.

    False negatives weigh more because candidates are verified on their estimated similarity
    afterwards: a false positive costs one comparison, a false negative a duplicate left in.
    """
    if cfg.bands is not None and cfg.rows is not None:
        return cfg.bands, cfg.rows
    best, best_error = (1, cfg.num_perm), float("inf")
    low = np.linspace(0.0, cfg.threshold, 200)
    high = np.linspace(cfg.threshold, 1.0, 200)
    for bands in range(1, cfg.num_perm + 1):
        for rows in range(1, cfg.num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - low**rows) ** bands, low)
            fn = np.trapezoid((1 - high**rows) ** bands, high)
            error = float(0.1 * fp + 0.9 * fn)
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_hashes(block: np.ndarray) -> np.ndarray:
    """One uint64 per row of a (documents, rows) uint32 block."""
    out = np.zeros(len(block), dtype=np.uint64)
    for column in range(block.shape[1]):
        out = (out ^ block[:, column].astype(np.uint64)) * np.uint64(0x100000001B3 + 2 * column)
    return out


def find_duplicates(keys: np.ndarray, signatures, n_previous: int, cfg: NearDedupConfig | None,
                    exact: bool) -> np.ndarray:
    """A reason code (KEEP, EXACT, NEAR, NEAR_PREVIOUS) for each current document.

    Rows ``[0, n_previous)`` of ``keys``/``signatures`` are earlier versions' documents, the rest
    the current corpus in order; the first document of a group is kept. A current document
    identical to an earlier version's document is that document again and is kept; one that is
    only similar to an earlier version's document is removed as NEAR_PREVIOUS.
    """
    current = np.arange(n_previous, len(keys))
    codes = np.zeros(len(current), dtype=np.int8)
    if exact and len(current):
        _, first = np.unique(keys[current], return_index=True)
        codes[:] = EXACT
        codes[first] = KEEP
    if cfg is None or signatures is None:
        return codes
    active = np.concatenate([np.arange(n_previous), current[codes == KEEP]])
    parent = _components(signatures, active, cfg)
    previous_keys = set(keys[:n_previous].tolist())
    groups: dict[int, list[int]] = {}
    for index in active.tolist():
        if index in parent:  # only documents with a verified near twin are in the union-find
            groups.setdefault(_find(parent, index), []).append(index)
    for members in groups.values():
        members.sort()
        cur = [m for m in members if m >= n_previous]
        if len(members) < 2 or not cur:
            continue
        if members[0] < n_previous:
            same = [m for m in cur if int(keys[m]) in previous_keys]
            keeper, reason = (same[0], NEAR) if same else (-1, NEAR_PREVIOUS)
        else:
            keeper, reason = cur[0], NEAR
        for m in cur:
            if m != keeper:
                codes[m - n_previous] = reason
    return codes


def _components(signatures, active: np.ndarray, cfg: NearDedupConfig) -> dict[int, int]:
    """Union-find parents (only for documents with a verified near twin)."""
    bands, rows = lsh_params(cfg)
    pairs: list[np.ndarray] = []
    for band in range(bands):
        hashes = band_hashes(np.asarray(signatures[active, band * rows:(band + 1) * rows]))
        order = np.argsort(hashes, kind="stable")
        ranked = hashes[order]
        starts = np.concatenate(([True], ranked[1:] != ranked[:-1]))
        if starts.all():
            continue
        leader = np.maximum.accumulate(np.where(starts, np.arange(len(ranked)), 0))
        members = np.flatnonzero(~starts)
        pairs.append(np.stack([active[order[leader[members]]], active[order[members]]], axis=1))
    parent: dict[int, int] = {}
    if not pairs:
        return parent
    edges = np.unique(np.concatenate(pairs), axis=0)
    if cfg.verify:
        edges = edges[_similarity(signatures, edges) >= cfg.threshold - cfg.verify_slack]
    for a, b in edges.tolist():
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            parent.setdefault(min(ra, rb), min(ra, rb))
    return parent


def _similarity(signatures, edges: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity (share of equal MinHash values) of each pair."""
    out = np.empty(len(edges))
    for lo in range(0, len(edges), _CHUNK):
        part = edges[lo: lo + _CHUNK]
        left, right = np.asarray(signatures[part[:, 0]]), np.asarray(signatures[part[:, 1]])
        out[lo: lo + _CHUNK] = (left == right).mean(axis=1)
    return out


def _find(parent: dict[int, int], node: int) -> int:
    root = node
    while parent.get(root, root) != root:
        root = parent[root]
    while parent.get(node, node) != root:  # path compression
        parent[node], node = root, parent[node]
    return root


# ---------------------------------------------------------------- earlier versions


class VersionStore:
    """Keys and signatures of each curated version's documents, so later versions dedup against them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _index(self) -> list[dict]:
        path = self.root / "versions.json"
        return json.loads(path.read_text())["versions"] if path.exists() else []

    def previous(self, cfg: NearDedupConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(keys, signatures, digests) of the latest ``cfg.previous_versions`` compatible versions."""
        keys: list[np.ndarray] = []
        sigs: list[np.ndarray] = []
        used: list[str] = []
        params = _params(cfg)
        for entry in reversed(self._index()):
            if len(used) >= cfg.previous_versions:
                break
            folder = self.root / entry["digest"]
            if entry["params"] != params or not (folder / "signatures.npy").exists():
                continue  # other MinHash settings: signatures are not comparable
            keys.append(np.load(folder / "keys.npy"))
            sigs.append(np.load(folder / "signatures.npy", mmap_mode="r"))
            used.append(entry["digest"])
        if not used:
            return np.empty(0, dtype=np.uint64), np.empty((0, cfg.num_perm), dtype=np.uint32), []
        return np.concatenate(keys), np.concatenate(sigs), used

    def save(self, digest: str, keys: np.ndarray, signatures: np.ndarray, cfg: NearDedupConfig) -> None:
        index = [e for e in self._index() if e["digest"] != digest]
        folder = self.root / digest
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "keys.npy", keys)
        np.save(folder / "signatures.npy", signatures)
        index.append({"digest": digest, "params": _params(cfg), "documents": len(keys)})
        atomic_write_json(self.root / "versions.json", {"versions": index})


def _params(cfg: NearDedupConfig) -> dict:
    return {"num_perm": cfg.num_perm, "shingle_size": cfg.shingle_size, "seed": cfg.seed}
