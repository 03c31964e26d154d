"""Plain-text progress for long steps, readable in a terminal, in Prefect logs and through Ray's
log forwarding alike (no cursor tricks: each update is one self-contained line on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def bar(done: int, total: int, width: int = 20) -> str:
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "▕" + "█" * filled + "░" * (width - filled) + f"▏ {done}/{total}"


def step_printer(label: str, totals: dict[str, int], offsets: dict[str, int]) -> Callable[[dict], None]:
    """A callback for training history rows: one bar line per logged step of each phase."""

    def show(record: dict) -> None:
        phase = record.get("phase", "")
        done = int(record["step"]) - offsets.get(phase, 0)
        rate = record.get("tokens_per_s")
        extra = f" {rate:,.0f} tok/s" if rate else ""
        # sys.stderr.write, not print: Ray Train patches print() in workers and would emit it twice.
        sys.stderr.write(f"{label} {phase:<9}{bar(done, totals.get(phase, done))} loss {record['loss']:.4f}{extra}\n")
        sys.stderr.flush()

    return show
