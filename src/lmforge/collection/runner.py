"""Run every source at once, each in its own thread, into one store; one failure stops only its source.

Each source's units go straight into the :class:`~lmforge.collection.shards.RawStore` from the
source's thread (parsing happens there too). A source that raises is recorded with its error (our
own errors carry cause and fix; anything else is reported with its type and its traceback on
stderr) while the others finish. A progress line per running source goes to stderr every
``progress_interval_s`` seconds.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.collection.shards import Interrupted, RawStore
from lmforge.collection.types import Source, SourceContext, Tally
from lmforge.collection.urls import redact_urls
from lmforge.core.errors import LmforgeError
from lmforge.core.progress import bar


@dataclass
class SourceReport:
    label: str
    type: str
    counts: Counter = field(default_factory=Counter)
    tally: Tally = field(default_factory=Tally)
    error: dict[str, str] | None = None
    expected: int | None = None
    seconds: float = 0.0
    done: bool = False

    def summary(self) -> dict[str, Any]:
        """Per-source facts of this run, as the summary and the manifest show them."""
        c = self.counts
        skipped, repaired, examples = self.tally.snapshot()
        return {
            "type": self.type, "documents": c["documents"], "new": c["new"], "bytes": c["bytes"],
            "units": c["units"], "unchanged": c["unchanged"], "changed": c["changed"],
            "skipped": skipped, "skipped_examples": examples, "repaired": repaired,
            "error": self.error["error"] if self.error else None, "seconds": round(self.seconds, 3),
        }


def new_reports(sources: list[tuple[str, str, Source]]) -> dict[str, SourceReport]:
    return {label: SourceReport(label, kind) for label, kind, _ in sources}


def run_sources(sources: list[tuple[str, str, Source]], store: RawStore, reports: dict[str, SourceReport],
                scratch_dir: Path, parallel: Any, concurrency: int, progress_interval_s: float,
                on_done: Callable[[str], None] | None = None) -> None:
    """Collect ``(label, type, source)`` triples concurrently, filling ``reports`` (see :func:`new_reports`)
    as they go, so every intermediate commit's manifest shows the run's progress."""
    stop = threading.Event()
    printer = None
    if progress_interval_s > 0:
        printer = threading.Thread(target=_print_progress, args=(reports, stop, progress_interval_s), daemon=True)
        printer.start()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="collect")
    try:
        futures = [pool.submit(_collect_one, label, source, store, reports[label], scratch_dir, parallel)
                   for label, _, source in sources]
        for future, (label, _, _) in zip(futures, sources):
            future.result()  # _collect_one records its errors; this only waits in order
            if on_done is not None:
                on_done(label)
    except BaseException:  # Ctrl-C or a failing callback: stop every source at its next unit
        store.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stop.set()
        if printer is not None:
            printer.join()


def _collect_one(label: str, source: Source, store: RawStore, report: SourceReport, scratch_dir: Path,
                 parallel: Any) -> None:
    started = time.monotonic()

    def expect(total: int) -> None:
        report.expected = total

    ctx = SourceContext(label, store.known, report.tally, scratch_dir, parallel, expect)
    try:
        for unit in source.units(ctx):
            report.counts.update(store.add_unit(label, unit))
    except Interrupted:
        pass  # the run is being stopped; the main thread raises the reason
    except LmforgeError as exc:
        report.error = {"source": label, "error": exc.cause, "fix": exc.fix}
    except OSError as exc:
        report.error = {"source": label, "error": f"{type(exc).__name__}: {exc}",
                        "fix": "check that the path or address exists and is readable"}
    except Exception as exc:  # noqa: BLE001 - a bug or an unexpected library error: reported, the others go on
        traceback.print_exc(file=sys.stderr)
        report.error = {"source": label, "error": f"{type(exc).__name__}: {exc}",
                        "fix": "unexpected error (traceback on stderr); please report it with the config"}
    finally:
        if report.error is not None:  # errors name URLs; none may carry its credentials into the manifest
            report.error = redact_urls(report.error)
        report.seconds = time.monotonic() - started
        report.done = True


def _print_progress(reports: dict[str, SourceReport], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        for report in reports.values():
            if report.done:
                continue
            c = report.counts
            total = report.expected if report.expected is not None else c["units"]
            skipped = sum(report.tally.snapshot()[0].values())
            sys.stderr.write(f"collect {report.label:<12}{bar(c['units'], total)} units, {c['documents']} documents "
                             f"({c['new']} new), {skipped} skipped\n")
        sys.stderr.flush()
