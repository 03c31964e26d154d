"""Command-line parts every benchmark shares: where its records go (``--out``), the tiny check
(``--tiny``), lists of names checked against their choices, and errors printed as ``error:``/``fix:``.

A real run's records go to bench/results/ (the project's record of measured figures). ``--out DIR``
or the environment variable ``LMFORGE_BENCH_OUT`` send them elsewhere, and a ``--tiny`` run given
neither writes to a new temporary directory, so a check of a script never lands among the figures.
Only the standard library and ``lmforge.core.errors``: the GPU benchmarks run on machines that
have torch, transformers and peft and little else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.common.record import RESULTS, command_line  # noqa: F401 - re-exported for the benchmarks
from lmforge.core.errors import ConfigError, LmforgeError

OUT_ENV = "LMFORGE_BENCH_OUT"


def add_common_arguments(parser: argparse.ArgumentParser, tiny_help: str) -> None:
    """``--out DIR`` and ``--tiny`` (whose help says what the tiny run does instead)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory of the records (default: ${OUT_ENV}, else bench/results; "
                             "with --tiny a new temporary directory)")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)


def out_dir(args: argparse.Namespace, default: Path = RESULTS) -> Path:
    """Where this run writes: ``--out``, else ``$LMFORGE_BENCH_OUT``, else a new temporary directory
    for ``--tiny``, else ``default``. Created if missing."""
    if args.out is not None:
        path = Path(args.out)
    elif os.environ.get(OUT_ENV):
        path = Path(os.environ[OUT_ENV])
    elif getattr(args, "tiny", False):
        path = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    else:
        path = default
    path.mkdir(parents=True, exist_ok=True)
    return path


def choose(names: Iterable[str], allowed: Iterable[str], what: str, option: str) -> list[str]:
    """``names`` in the order given (repeats dropped), each checked against ``allowed``."""
    allowed = list(allowed)
    chosen: list[str] = []
    for name in names:
        if name not in allowed:
            parts = [p for p in name.split(",") if p]
            if len(parts) > 1 and all(p in allowed for p in parts):
                raise ConfigError(f"{option} got the comma-joined {what}s {name!r}",
                                  f"give them as separate words: {option} {' '.join(parts)}")
            raise ConfigError(f"unknown {what} {name!r} for {option}", f"choose from: {' '.join(allowed)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def run(main: Callable[[], int | None]) -> None:
    """Run a benchmark's ``main`` and exit with its status; an ``LmforgeError`` (a bad option, a
    missing input) prints as ``error:``/``fix:`` lines without a traceback, as the lmforge CLI does."""
    try:
        status = main()
    except LmforgeError as exc:
        print(f"error: {exc.cause}\n  fix: {exc.fix}", file=sys.stderr)
        status = exc.exit_code
    sys.exit(status or 0)
