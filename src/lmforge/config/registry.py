"""The ``registry`` section: the MLflow registered model, its alias, and the rule that promotes a candidate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config.base import Section


class RegistryConfig(Section):
    """The register and promote stages' section."""

    model_name: str = Field("lmforge-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            description="Registered model name in MLflow.")
    experiment: str = Field("lmforge", min_length=1, description="MLflow experiment of the runs.")
    alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]*$",
                       description="Alias that promotion moves and deployment serves (models:/NAME@ALIAS).")
    metric: str = Field("eval_perplexity", description="Metric that decides promotion.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    min_improvement: float = Field(
        0.01, ge=0, description="Relative margin the candidate must beat the champion by (0.01 = 1%)."
    )
