"""The ``registry`` section: the MLflow registered model, its alias, and the policy that promotes a candidate.

``registry.policy`` holds the promotion rule: the deciding metric with its direction and margin,
guardrails (metrics that may not regress by more than a tolerance against the champion), and an
optional human approval step. The flat ``metric``/``mode``/``min_improvement`` keys of older files
moved into ``policy`` (``RegistryConfig.moved_keys`` names the new place in the error).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section


class Guardrail(Section):
    """One metric that may not get worse than the champion's by more than ``max_regression``."""

    metric: str = Field(min_length=1, description="Logged metric on the version's run (e.g. eval_rouge_l).")
    direction: Literal["min", "max"] = Field("min", description="Whether lower or higher is better for this metric.")
    max_regression: float = Field(
        0.0, ge=0,
        description="How much worse than the champion the candidate may be; 0 allows no regression at all.",
    )
    kind: Literal["relative", "absolute"] = Field(
        "relative",
        description="relative: max_regression is a fraction of the champion's value (0.02 = 2%); "
        "absolute: in the metric's own units.",
    )


class ApprovalConfig(Section):
    """A human decides after the rules pass (a Prefect input form in a flow; the CLI otherwise)."""

    # Not `required`: Prefect validates flow parameters against their JSON schema, where a property
    # of that name is read as the schema keyword and the deployment is refused.
    enabled: bool = Field(False, description="Wait for a person to approve a candidate the rules would promote.")
    timeout_s: int = Field(
        3600, ge=1,
        description="Seconds the paused flow waits for an answer in the Prefect UI; no answer rejects the candidate.",
    )


class PolicyConfig(Section):
    """The promotion rule: the deciding metric, its margin, guardrails, approval."""

    metric: str = Field("eval_perplexity", min_length=1, description="Metric that decides promotion.")
    direction: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    margin: float = Field(
        0.01, ge=0, description="Relative margin the candidate must beat the champion by (0.01 = 1%)."
    )
    guardrails: list[Guardrail] = Field(
        default_factory=list,
        description="Metrics that may not regress against the champion by more than their tolerance.",
    )
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)

    @model_validator(mode="after")
    def _distinct_guardrails(self) -> PolicyConfig:
        names = [g.metric for g in self.guardrails]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"guardrails list {repeated} more than once; keep one entry per metric")
        return self


class RegistryConfig(Section):
    """The register and promote stages' section."""

    model_name: str = Field("lmforge-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            description="Registered model name in MLflow.")
    experiment: str = Field("lmforge", min_length=1, description="MLflow experiment of the runs.")
    alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]*$",
                       description="Alias that promotion moves and deployment serves (models:/NAME@ALIAS).")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    # The flat rule keys of files written before registry.policy, and where each lives now.
    moved_keys: ClassVar[Mapping[str, str]] = {
        "metric": "policy.metric", "mode": "policy.direction", "min_improvement": "policy.margin",
    }
