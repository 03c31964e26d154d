"""The held-out split: which records are kept for training and which are held out, by hash.

A record's side depends only on its key, so it never moves between runs as the data around it
grows, and a document held out for evaluation never leaks into training.
"""

from __future__ import annotations

import hashlib


def split_bucket(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key``: the same key lands in the same split forever."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def heldout_ids(ids: list[str], fraction: float) -> set[str]:
    """The keys held out of ``ids``: those whose bucket is below ``fraction``.

    With two or more keys each side gets at least one, so a tiny corpus still has something to
    train on and something to evaluate on.
    """
    ranked = sorted(ids, key=lambda i: (split_bucket(i), i))
    cut = sum(1 for i in ranked if split_bucket(i) < fraction)
    if len(ranked) >= 2:
        cut = min(max(cut, 1), len(ranked) - 1)
    return set(ranked[:cut])


def hash_split(items: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Split items by the hash of their ``id`` into (kept, held out), each sorted by id."""
    held = heldout_ids([item["id"] for item in items], fraction)
    ordered = sorted(items, key=lambda i: i["id"])
    return [i for i in ordered if i["id"] not in held], [i for i in ordered if i["id"] in held]
