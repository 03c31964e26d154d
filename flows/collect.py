"""The lmforge-collect flow: one incremental collect run, for the stack's data watcher.

``lmforge stack deploy`` registers it as ``lmforge-collect/watch`` on a short interval
(``platform.watch_interval_s``, active with ``platform.retrain_on_new_data``). Collect reads only new or
changed units, so a run that finds nothing costs a listing; one that finds new documents emits
``lmforge.data.collected`` (their count in the payload), the event that starts ``lmforge-pipeline/retrain``.
"""

# No `from __future__ import annotations` here: Prefect builds its parameter model from the
# signature at run time and must see real classes, not strings.
from typing import Any

from prefect import flow

from lmforge.config import DataConfig
from tasks.data import collect_task


@flow(name="lmforge-collect", log_prints=True, description=__doc__)
def collect_flow(data: DataConfig = DataConfig()) -> dict[str, Any]:  # noqa: B008 - frozen, so one shared default is safe
    """Collect ``data.sources`` into the workspace; returns the collect summary (``documents_new`` among it).

    Args:
        data: The pipeline config's data section.
    """
    return collect_task(data)
