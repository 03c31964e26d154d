"""The promotion policy as arithmetic: does a candidate's metrics beat the champion's, and do the guardrails hold.

Pure functions over numbers (no MLflow): the promote stage reads the two versions' metrics and
records what :func:`judge` returns. The deciding metric must improve by at least the margin
(relative, in the metric's direction); each guardrail metric may get worse by at most its tolerance
(relative to the champion's value, or absolute). A guardrail the candidate cannot show (metric not
logged, NaN) fails: a promotion you can trust does not assume the missing number was fine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.config.registry import Guardrail, PolicyConfig
from lmforge.evaluation.metrics import relative_improvement

# Which rule decided (the summary's `promote.rule`).
RULE_FIRST = "first_version"
RULE_METRIC = "metric"
RULE_GUARDRAIL = "guardrail"
RULE_INVALID = "invalid_candidate"
RULE_UNCHANGED = "already_champion"
RULE_CHAMPION_UNUSABLE = "champion_unusable"
RULE_APPROVAL = "approval"
RULE_APPROVAL_TIMEOUT = "approval_timeout"

# Float noise must not fail a guardrail whose tolerance is exactly met (0.02 of 100.0 is 2.0000000000000018).
_EPS = 1e-9


@dataclass(frozen=True)
class GuardrailCheck:
    """One guardrail against the champion: the numbers, the tolerance it allowed, and the outcome."""

    metric: str
    candidate: float | None
    champion: float | None
    tolerance: float  # max_regression as configured
    kind: str  # relative | absolute
    direction: str  # min | max
    regression: float | None  # how much worse the candidate is, in the metric's units (negative: better)
    passed: bool
    note: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """What the rules say about a candidate: pass or not, which rule decided, why, and every guardrail."""

    passed: bool
    rule: str
    reason: str
    guardrails: tuple[GuardrailCheck, ...]

    @property
    def unchanged(self) -> bool:
        return self.rule == RULE_UNCHANGED


def check_guardrail(guard: Guardrail, candidate: float | None, champion: float | None) -> GuardrailCheck:
    """Whether ``candidate`` stays within ``guard``'s tolerance of ``champion``."""
    def result(passed: bool, note: str, regression: float | None = None) -> GuardrailCheck:
        return GuardrailCheck(guard.metric, candidate, champion, guard.max_regression, guard.kind, guard.direction,
                              regression, passed, note)

    if candidate is None or math.isnan(candidate):
        return result(False, f"the candidate has no usable {guard.metric}, so it cannot show it did not regress")
    if champion is None or math.isnan(champion):
        return result(True, f"the champion has no usable {guard.metric}; nothing to regress from")
    regression = candidate - champion if guard.direction == "min" else champion - candidate
    allowed = guard.max_regression * abs(champion) if guard.kind == "relative" else guard.max_regression
    shown = f"{guard.max_regression:.2%} of {champion:.6g}" if guard.kind == "relative" else f"{guard.max_regression:.6g}"
    worse = "higher" if guard.direction == "min" else "lower"
    if regression <= allowed + _EPS:
        return result(True, f"{guard.metric} {candidate:.6g} vs {champion:.6g}: within {shown}", regression)
    return result(False, f"{guard.metric} {candidate:.6g} is {abs(regression):.6g} {worse} than the champion's "
                         f"{champion:.6g}; at most {shown} allowed", regression)


def check_guardrails(policy: PolicyConfig, candidate: Mapping[str, float],
                     champion: Mapping[str, float] | None) -> tuple[GuardrailCheck, ...]:
    """Every configured guardrail, in config order (``champion`` None: no champion yet)."""
    return tuple(check_guardrail(g, candidate.get(g.metric), None if champion is None else champion.get(g.metric))
                 for g in policy.guardrails)


def judge(policy: PolicyConfig, version: str, candidate: Mapping[str, float],
          champion_version: str | None, champion: Mapping[str, float] | None) -> Verdict:
    """The rules on a candidate's metrics against the champion's (None when there is no champion).

    Order: an unusable candidate never passes; the first version passes; the holder of the alias is
    left as it is; the deciding metric must beat the champion by the margin; then every guardrail
    must hold. Guardrails are checked (and reported) in every case but the first two.
    """
    metric = policy.metric
    value = candidate.get(metric)
    label = f"candidate v{version} {metric}={value:.6g}" if value is not None else f"candidate v{version}"
    if value is None or math.isnan(value):
        return Verdict(False, RULE_INVALID, f"{label} has no usable {metric}; kept {_holder(champion_version)}", ())
    if champion_version is None or champion is None:
        return Verdict(True, RULE_FIRST, f"first version: {label}; no champion yet",
                       check_guardrails(policy, candidate, None))
    guards = check_guardrails(policy, candidate, champion)
    if champion_version == version:
        return Verdict(False, RULE_UNCHANGED, f"v{version} already holds the alias ({metric}={value:.6g})", guards)
    held = champion.get(metric)
    if held is None or math.isnan(held):
        verdict = Verdict(True, RULE_CHAMPION_UNUSABLE,
                          f"{label}; champion v{champion_version} has no usable {metric}, so the measured one wins", guards)
        return _guarded(verdict, guards, champion_version)
    gain = relative_improvement(value, held, policy.direction)
    better = "lower" if policy.direction == "min" else "higher"
    comparison = (f"{label} vs champion v{champion_version} {held:.6g}: {gain:+.2%} "
                  f"({better} is better; needs at least +{policy.margin:.2%})")
    if not (gain > 0 and gain >= policy.margin):
        return Verdict(False, RULE_METRIC, f"{comparison}; kept v{champion_version}", guards)
    return _guarded(Verdict(True, RULE_METRIC, f"{comparison}; rules pass", guards), guards, champion_version)


def _guarded(verdict: Verdict, guards: tuple[GuardrailCheck, ...], champion_version: str) -> Verdict:
    """``verdict`` unless a guardrail failed, in which case the guardrail decides (rejected)."""
    failed = [g for g in guards if not g.passed]
    if not failed:
        return verdict
    why = "; ".join(g.note for g in failed)
    return Verdict(False, RULE_GUARDRAIL, f"{verdict.reason.removesuffix('; rules pass')}; but guardrail"
                                          f"{'s' if len(failed) > 1 else ''} failed: {why}; kept v{champion_version}",
                   guards)


def _holder(champion_version: str | None) -> str:
    return f"v{champion_version}" if champion_version else "no champion"
