"""The held-out split: which records are kept for training and which are held out, by hash.

A record's side depends only on its key, so it never moves between runs as the data around it
grows, and a document held out for evaluation never leaks into training. Collect splits the SFT
pairs into train/test and curate the documents into train/validation with the unsalted hash; the
tokenize stage and training on the fly cut fine-tuning validation records out of SFT train with a
salted one (see :func:`split_bucket`), through :func:`lmforge.data.sft.split_finetune`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def split_bucket(key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) fixed by ``key``: the same key lands in the same split forever.

    ``salt`` gives a second split of the same keys, independent of the first. It matters when
    records already chosen by the unsalted hash are split again: every record on one side of an
    unsalted cut has a bucket beyond it, so a second unsalted cut below it would hold out nothing.
    """
    text = f"{salt}:{key}" if salt else key
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def heldout_ids(ids: list[str], fraction: float, salt: str = "") -> set[str]:
    """The keys held out of ``ids``: those whose bucket is below ``fraction``.

    With two or more keys each side gets at least one, so a tiny corpus still has something to
    train on and something to evaluate on.
    """
    ranked = sorted(ids, key=lambda i: (split_bucket(i, salt), i))
    cut = sum(1 for i in ranked if split_bucket(i, salt) < fraction)
    if len(ranked) >= 2:
        cut = min(max(cut, 1), len(ranked) - 1)
    return set(ranked[:cut])


def hash_split(items: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Split items by the hash of their ``id`` into (kept, held out), each sorted by id."""
    held = heldout_ids([item["id"] for item in items], fraction)
    ordered = sorted(items, key=lambda i: i["id"])
    return [i for i in ordered if i["id"] not in held], [i for i in ordered if i["id"] in held]


def split_by_key(items: list[T], fraction: float, key: Callable[[T], str], salt: str = "") -> tuple[list[T], list[T]]:
    """Split items by the hash of ``key(item)`` into (kept, held out), each in the order given.

    Items that share a key land on the same side; the at-least-one rule of :func:`heldout_ids`
    counts distinct keys.
    """
    keys = [key(item) for item in items]
    held = heldout_ids(list(dict.fromkeys(keys)), fraction, salt)
    return ([item for item, k in zip(items, keys) if k not in held],
            [item for item, k in zip(items, keys) if k in held])
