"""Benchmark: tokenized-shard read throughput from an object store through the read cache, against
local disk, CPU.

    .venv/bin/python -m bench.platform.storage [--rows 8192] [--seq-len 512] [--shards 8] [--repeats 5] [--tiny] [--out DIR]

One tokenized dataset (``pretrain/train`` of the layout :mod:`lmforge.data.tokenized` describes:
``datasets`` Arrow shards of packed rows with ``input_ids``, ``labels`` and ``attention_mask``, plus
``manifest.json``) is written through ``lmforge.core.storage``'s ``Store.atomic_dir`` twice: to a
local directory and to an S3-compatible server on loopback (moto's ``ThreadedMotoServer``, found
through ``AWS_ENDPOINT_URL`` as a user's MinIO would be). Each read is what training does with it:
a local directory (``Store.cached_dir``: the directory itself locally; on the store, copies in the
read cache keyed by the manifest's sha256), opened with ``datasets.load_from_disk`` and turned into
long tensors, every row. Timed, the median of ``--repeats`` rounds of one read of each kind:

* **local**: the local directory (just written, so from the page cache, as a hot local dataset is);
* **store, cold**: an empty read cache each time, so every shard is downloaded and its sha256 checked;
* **store, warm**: the cache filled, so one manifest request and then local reads.

MB are the bytes of the dataset's files (its shards, their ``datasets`` metadata and manifest.json).
``--tiny``: 256 rows of 64 tokens in 2 shards, a check of this script. Figures go to
OUT/platform_storage.jsonl (``bench.common.record``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from lmforge.core.storage import ReadCache, Store, open_store

BENCH = "platform_storage"
BUCKET = "lmforge-bench"
SPLIT = Path("pretrain") / "train"
# Fake credentials for the loopback server, set only in this process (boto's standard chain reads them).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lmforge-bench", "AWS_SECRET_ACCESS_KEY": "lmforge-bench",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port with one bucket; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        server.stop()


def packed_rows(rows: int, seq_len: int, vocab: int = 32000, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows shaped as :mod:`lmforge.data.packing` packs them (every position a target, no padding)."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(rows, seq_len), dtype=np.int64)
    return {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}


def write_dataset(store: Store, key: str, columns: dict[str, np.ndarray], shards: int) -> None:
    """The tokenized layout, committed through the store (a rename locally; a marker on the store)."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    rows, seq_len = columns["input_ids"].shape
    offsets = pa.array(np.arange(0, rows * seq_len + 1, seq_len, dtype=np.int32))
    table = pa.table({name: pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))
                      for name, values in columns.items()})
    with store.atomic_dir(key) as tmp:
        datasets.Dataset(table).save_to_disk(str(tmp / SPLIT), num_shards=shards)
        (tmp / "manifest.json").write_text(json.dumps({"digest": key.rsplit("/", 1)[-1], "rows": {"pretrain":
                                                       {"train": rows}}, "seq_len": {"pretrain": seq_len}}))


def read_dataset(store: Store, key: str) -> int:
    """What training does with the dataset: a local directory, loaded, every row as long tensors.
    Returns the rows read."""
    import datasets
    import torch

    directory = store.cached_dir(key)
    table = datasets.load_from_disk(str(directory / SPLIT)).with_format("numpy")
    tensors = {name: torch.from_numpy(np.asarray(values)).long() for name, values in table[:].items()}
    return int(tensors["input_ids"].shape[0])


def timed(read: Callable[[], int]) -> tuple[float, int]:
    """Seconds of one read and the rows it read. ``os.sync()`` first, untimed, so the write-back of
    files just written (the dataset, a cold read's downloads) does not slow the read timed next."""
    os.sync()
    started = time.perf_counter()
    rows = read()
    return time.perf_counter() - started, rows


def rounds(local: Store, remote: Store, key: str, repeats: int, caches: Path) -> dict[str, tuple[float, int]]:
    """Median seconds (and rows) of local, cold and warm reads, taken in rounds of one of each so a
    change of the machine's load falls on all three alike."""
    files = len(remote.committed_files(key))
    times: dict[str, list[float]] = {"local": [], "store_cold": [], "store_warm": []}
    rows: dict[str, int] = {}
    for i in range(repeats):
        # The same store with an empty read cache of its own: every shard downloads.
        store = Store(remote.location, remote.fs, ReadCache(caches / f"cache-{i}"))
        for name, target in (("local", local), ("store_cold", store), ("store_warm", store)):
            seconds, rows[name] = timed(functools.partial(read_dataset, target, key))
            times[name].append(seconds)
        if (store.stats.cache_misses, store.stats.cache_hits) != (files, 1):
            raise AssertionError(f"a cold read hit, or the warm read missed, the read cache: {store.stats.as_dict()}")
    return {name: (statistics.median(values), rows[name]) for name, values in times.items()}


def dataset_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="packed rows (default 8192; 256 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 512; 64 with --tiny)")
    parser.add_argument("--shards", type=int, default=None, help="Arrow shards (default 8; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of one local, one cold and one warm read (medians; default 5)")
    add_common_arguments(parser, "256 rows of 64 tokens in 2 shards: a check of this script")
    args = parser.parse_args()
    args.rows = args.rows or (256 if args.tiny else 8192)
    args.seq_len = args.seq_len or (64 if args.tiny else 512)
    args.shards = args.shards or (2 if args.tiny else 8)
    out = out_dir(args)
    command = (f".venv/bin/python -m bench.platform.storage --rows {args.rows} --seq-len {args.seq_len} "
               f"--shards {args.shards} --repeats {args.repeats}" + (" --tiny" if args.tiny else ""))
    columns = packed_rows(args.rows, args.seq_len)
    key = "tokenized/" + content_digest(columns)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-storage-") as tmp, s3_server():
        local = open_store(Path(tmp) / "local")
        remote = open_store(f"s3://{BUCKET}/ws")
        write_dataset(local, key, columns, args.shards)
        write_dataset(remote, key, columns, args.shards)
        megabytes = dataset_bytes(local.cached_dir(key)) / 1e6
        load = os.getloadavg()
        results = rounds(local, remote, key, args.repeats, Path(tmp))
    local_s, rows = results["local"]
    baseline = (f"local disk (page cache warm), the same {rows} rows x {args.seq_len} tokens in {args.shards} "
                f"datasets shards, same run")
    for name, (seconds, read) in results.items():
        if read != rows:
            raise AssertionError(f"the {name} read gave {read} rows, local {rows}")
        for metric, unit, value, base in ((f"{name}_MB_per_s", "MB/s", megabytes / seconds, megabytes / local_s),
                                          (f"{name}_rows_per_s", "rows/s", rows / seconds, rows / local_s)):
            row = record(BENCH, metric, round(value, 2), unit, baseline, None if name == "local" else round(base, 2),
                         command=command, out_dir=out)
            print(json.dumps(row))
    print(f"{rows} rows, {megabytes:.1f} MB in {args.shards} shards: local {local_s:.3f}s, store cold "
          f"{results['store_cold'][0]:.3f}s, store warm {results['store_warm'][0]:.3f}s (medians of "
          f"{args.repeats} rounds); load average at the start {load[0]:.2f}", file=sys.stderr)


def content_digest(columns: dict[str, np.ndarray]) -> str:
    """A content digest for the dataset's name, as the tokenize stage names its datasets."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(columns):
        digest.update(name.encode())
        digest.update(columns[name].tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    run(main)
