"""Append one benchmark figure to bench/results/<bench>.jsonl in the project's one format.

Every benchmark measures its baseline in the same run and records both, with the device and
the exact command, so bench/RESULTS.md rows can always be reproduced:
``{"bench", "metric", "value", "unit", "baseline", "baseline_value", "ratio", "device", "commit",
"command", "date"}``. Standard library only (torch is asked for the device name if present).
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
FIELDS = ("bench", "metric", "value", "unit", "baseline", "baseline_value", "ratio", "device", "commit", "command",
          "date")


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{_cpu_count()}"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(prefix: str = "python", argv: list[str] | None = None) -> str:
    """This run as the command that repeats it, ``python -m bench.<group>.<name> ARGS``, without
    ``--out`` (where the records go is not part of what was measured)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            shown.append(arg)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name.removesuffix(".__main__") if spec is not None else Path(sys.argv[0]).name
    return " ".join([prefix, "-m", module, *shown])


def record(bench: str, metric: str, value: float, unit: str, baseline: str, baseline_value: float | None,
           device: str | None = None, command: str | None = None, higher_is_better: bool = True,
           out_dir: Path | None = None) -> dict:
    """Write one figure; ``ratio`` is ours over the baseline (inverted when lower is better)."""
    ratio = None
    if baseline_value:
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    row = {
        "bench": bench, "metric": metric, "value": value, "unit": unit, "baseline": baseline,
        "baseline_value": baseline_value, "ratio": None if ratio is None else round(ratio, 4),
        "device": device or device_name(), "commit": _commit(),
        "command": command or command_line(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    target = (out_dir or RESULTS) / f"{bench}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row
