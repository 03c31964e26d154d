"""Benchmark: local-file collection throughput (documents/s and MB/s, per core), CPU.

    .venv/bin/python -m bench.data.collect_local [--files 3000] [--workers 0] [--tiny] [--out DIR]

Generates a corpus of a few thousand files (plain text, Markdown, HTML pages with boilerplate,
JSONL and CSV record files), then measures in the same run:
  * baseline: a naive single-threaded loop that reads each file, decodes it and hashes it;
  * the collect stage reading it serially (one core) and with its process pool (``--workers``,
    0 = every CPU), each into a fresh workspace; and an incremental re-run (nothing changed).
MB are input bytes on disk. Figures go to OUT/collect_local.jsonl (``bench.common.record``).
``--tiny``: 60 files and 2 workers, a check of this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from lmforge.config.data import DataConfig, InstructionConfig, LocalSource, ParallelConfig
from lmforge.core.runtime import cpu_count
from lmforge.core.workspace import Workspace
from lmforge.stages.collect import collect

WORDS = ["data", "model", "text", "token", "corpus", "crawler", "shard", "parquet", "manifest", "source", "record",
         "page", "feed", "bucket", "language", "training", "evaluation", "registry", "python", "library", "function",
         "module", "parser", "archive"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."


def _paragraphs(rng: random.Random, n: int) -> str:
    return "\n\n".join(" ".join(_sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(n))


def make_corpus(root: Path, files: int, seed: int = 0) -> int:
    """Write ``files`` files of mixed formats under ``root``; returns their total size in bytes."""
    rng = random.Random(seed)
    for i in range(files):
        folder = root / f"d{i % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 10
        if kind < 4:
            (folder / f"f{i}.txt").write_text(f"Document {i}. " + _paragraphs(rng, rng.randint(2, 6)))
        elif kind < 6:
            (folder / f"f{i}.md").write_text(f"# Title {i}\n\n" + _paragraphs(rng, rng.randint(2, 6)))
        elif kind < 8:
            body = "".join(f"<p>{_sentence(rng)} {_sentence(rng)}</p>" for _ in range(rng.randint(4, 10)))
            (folder / f"f{i}.html").write_text(
                f"<html><head><title>Page {i}</title><script>var x={i};</script></head><body><nav>Home | About</nav>"
                f"<article><h1>Page {i}</h1>{body}</article><footer>Copyright</footer></body></html>")
        elif kind == 8:
            (folder / f"f{i}.jsonl").write_text("".join(
                json.dumps({"text": f"Record {i}.{j}. " + _paragraphs(rng, 1), "n": j}) + "\n" for j in range(10)))
        else:
            rows = "".join(f'"Row {i}.{j}. {_sentence(rng)}",{j}\n' for j in range(10))
            (folder / f"f{i}.csv").write_text("text,n\n" + rows)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def naive_loop(root: Path) -> float:
    """Seconds for the baseline: read, decode and hash every file in one thread."""
    started = time.perf_counter()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            hashlib.sha256(path.read_bytes().decode("utf-8").encode("utf-8")).hexdigest()
    return time.perf_counter() - started


def timed_collect(root: Path, home: Path, parallel: ParallelConfig) -> tuple[float, int]:
    cfg = DataConfig(sources=[LocalSource(paths=[str(root)])], instructions=InstructionConfig(source="none"),
                     parallel=parallel, progress_interval_s=0)
    started = time.perf_counter()
    result = collect(cfg, Workspace(home))
    return time.perf_counter() - started, result.documents_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=None, help="files in the corpus (default 3000; 60 with --tiny)")
    parser.add_argument("--workers", type=int, default=None, help="processes of the pool (default 0: every CPU; "
                        "2 with --tiny)")
    add_common_arguments(parser, "a small corpus and 2 workers: a check of this script")
    args = parser.parse_args()
    args.files = args.files or (60 if args.tiny else 3000)
    args.workers = (2 if args.tiny else 0) if args.workers is None else args.workers
    out = out_dir(args)
    workers = args.workers or cpu_count()
    command = (f".venv/bin/python -m bench.data.collect_local --files {args.files} --workers {args.workers}"
               + (" --tiny" if args.tiny else ""))
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        root = Path(tmp) / "corpus"
        size_mb = make_corpus(root, args.files) / 1e6
        naive_loop(root)  # warm the page cache so every variant reads from memory
        naive_s = naive_loop(root)
        serial_s, docs = timed_collect(root, Path(tmp) / "serial", ParallelConfig(backend="serial"))
        pool_s, _ = timed_collect(root, Path(tmp) / "pool", ParallelConfig(backend="processes", workers=workers))
        rerun_s, _ = timed_collect(root, Path(tmp) / "pool", ParallelConfig(backend="processes", workers=workers))
    baseline = "naive single-thread read+decode+sha256 loop (same files, same run)"
    figures = [
        ("serial_MB_per_s", size_mb / serial_s, "MB/s", size_mb / naive_s),
        ("serial_documents_per_s", docs / serial_s, "documents/s", args.files / naive_s),
        ("parallel_MB_per_s", size_mb / pool_s, "MB/s", size_mb / naive_s),
        ("parallel_MB_per_s_per_core", size_mb / pool_s / workers, "MB/s/core", size_mb / naive_s),
        ("parallel_documents_per_s", docs / pool_s, "documents/s", args.files / naive_s),
        ("unchanged_rerun_files_per_s", args.files / rerun_s, "files/s", args.files / naive_s),
    ]
    for metric, value, unit, base in figures:
        row = record("collect_local", metric, round(value, 2), unit, baseline, round(base, 2), command=command,
                     out_dir=out)
        print(json.dumps(row))
    print(f"{args.files} files, {size_mb:.1f} MB, {docs} documents; naive {naive_s:.2f}s, serial {serial_s:.2f}s, "
          f"{workers} workers {pool_s:.2f}s, unchanged re-run {rerun_s:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    run(main)
