"""The lmforge-tune flow: hyperparameter search over the config's ``tune.space`` (Ray Tune, ASHA).

``lmforge tune CONFIG`` runs the same stage without Prefect; this flow runs it as a Prefect flow
run (``from flows.tune import tune_flow; tune_flow(config=...)``), so a search shows up in the Prefect
UI beside the pipeline, with the summary as an artifact.
"""

# No `from __future__ import annotations` here: Prefect builds its parameter model from the
# signature at run time and must see real classes, not strings.
from typing import Any

from prefect import flow

from lmforge.config import PipelineConfig
from tasks.tuning import tune_task


@flow(name="lmforge-tune", log_prints=True, description=__doc__)
def tune_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 - frozen, so one shared default is safe
    """Search ``config.tune.space`` on the workspace's tokenized data; returns the search's summary.

    Args:
        config: The pipeline config (its tune, training, model, registry and platform sections).
    """
    return tune_task(config)
