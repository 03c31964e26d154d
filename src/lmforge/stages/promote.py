"""The promote stage: move the alias (``champion``) to a registered version only by ``registry.policy``.

Run it with ``lmforge promote CONFIG [VERSION]``; ``lmforge run`` promotes after registering. The
policy (:mod:`lmforge.tracking.policy`) is the deciding metric with its margin plus guardrails. When
``registry.policy.approval.enabled`` is on, a candidate the rules pass is left *pending*: in the
pipeline flow the flow run pauses with an input form in the Prefect UI (``tasks/approval.py``);
outside a flow it stays a candidate until ``lmforge promote CONFIG --approve VERSION`` (or
``--reject VERSION``), which :func:`settle_approval` records. Every decision is written on the
version as ``lmforge.promotion.*`` tags (both metrics, the rule that decided, each guardrail,
the approval) and on its model card (:mod:`lmforge.tracking.card`).
"""

from __future__ import annotations

import getpass
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import PolicyConfig, RegistryConfig
from lmforge.core.errors import RegistryError
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen_store import TAG_DIGEST, TAG_TOKENIZER
from lmforge.evaluation.metrics import EVAL_BITS_PER_BYTE, PER_TOKEN_METRICS
from lmforge.tracking.alias_history import now, record_move
from lmforge.tracking.card import publish_card
from lmforge.tracking.mlflow_tracker import mlflow_client, run_metric
from lmforge.tracking.model_uris import get_version, version_by_alias
from lmforge.tracking.policy import RULE_APPROVAL, RULE_APPROVAL_TIMEOUT, Verdict, judge

PROMOTED, REJECTED, PENDING, UNCHANGED = "promoted", "rejected", "pending", "unchanged"
TAG = "lmforge.promotion."


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    decision: str  # promoted | rejected | pending (waiting for approval) | unchanged (already the champion)
    rule: str  # which rule decided (tracking.policy.RULE_*)
    reason: str
    alias: str
    name: str
    metric: str  # the deciding metric actually compared (bits per byte when tokenizers differ)
    candidate_version: str
    champion_version: str | None  # holder of the alias after the decision
    previous_champion_version: str | None
    candidate_value: float | None
    champion_value: float | None
    guardrails: list[dict[str, Any]] = field(default_factory=list)
    approval: dict[str, Any] | None = None
    card: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def promote(cfg: RegistryConfig, platform: PlatformConfig | None, ws: Workspace, version: str) -> PromotionDecision:
    """Apply ``cfg.policy`` to ``version``: promote it, reject it, or leave it pending approval."""
    client = mlflow_client(ws, platform)
    policy, verdict, facts = _judge(client, cfg, ws, platform, str(version))
    if verdict.passed and cfg.policy.approval.enabled:
        how = (f"approve it in the Prefect UI (the paused flow run), or with `lmforge promote CONFIG --approve "
               f"{version}` (`--reject {version}` to reject)")
        return _record(client, cfg, ws, facts, policy, verdict, PENDING, f"{verdict.reason}; waiting for approval: {how}",
                       approval={"required": True, "outcome": PENDING})
    outcome = PROMOTED if verdict.passed else UNCHANGED if verdict.unchanged else REJECTED
    return _record(client, cfg, ws, facts, policy, verdict, outcome, verdict.reason)


def settle_approval(cfg: RegistryConfig, platform: PlatformConfig | None, ws: Workspace, version: str, *,
                    approved: bool, comment: str = "", by: str | None = None, via: str = "cli",
                    timed_out: bool = False) -> PromotionDecision:
    """Record a person's answer on ``version``; an approval promotes only if the rules still pass.

    The rules are applied again at approval time: the champion may have moved while the candidate
    waited, and a candidate that no longer beats it is rejected with the rule that failed.
    """
    client = mlflow_client(ws, platform)
    policy, verdict, facts = _judge(client, cfg, ws, platform, str(version))
    approval = {"required": cfg.policy.approval.enabled, "approved": approved, "comment": comment,
                "by": by or _user(), "via": via, "at": now(), "timed_out": timed_out}
    if not approved:
        why = "no answer before the approval timeout" if timed_out else f"rejected by {approval['by']} ({via})"
        rule = RULE_APPROVAL_TIMEOUT if timed_out else RULE_APPROVAL
        verdict = Verdict(False, rule, f"{why}{': ' + comment if comment else ''}; rules said: {verdict.reason}; "
                                       f"kept {_holder(facts['champion_version'])}", verdict.guardrails)
        return _record(client, cfg, ws, facts, policy, verdict, REJECTED, verdict.reason, approval | {"outcome": REJECTED})
    if not verdict.passed:
        outcome = UNCHANGED if verdict.unchanged else REJECTED
        return _record(client, cfg, ws, facts, policy, verdict, outcome,
                       f"approved by {approval['by']}, but the rules no longer pass: {verdict.reason}",
                       approval | {"outcome": outcome})
    verdict = Verdict(True, RULE_APPROVAL, f"{verdict.reason}; approved by {approval['by']} ({via})"
                                           f"{': ' + comment if comment else ''}", verdict.guardrails)
    return _record(client, cfg, ws, facts, policy, verdict, PROMOTED, verdict.reason, approval | {"outcome": PROMOTED})


def _judge(client: Any, cfg: RegistryConfig, ws: Workspace, platform: PlatformConfig | None,
           version: str) -> tuple[PolicyConfig, Verdict, dict[str, Any]]:
    """The policy actually applied (see :func:`comparable_policy`), its verdict, and the facts it saw."""
    name = cfg.model_name
    candidate = get_version(client, name, version, ws, platform)
    champion = version_by_alias(client, name, cfg.alias)
    policy, note = comparable_policy(cfg.policy, client, candidate, champion)
    metrics = dict(client.get_run(candidate.run_id).data.metrics)
    if policy.metric not in metrics:
        raise RegistryError(
            f"version {version} of {name!r} has no metric {policy.metric!r}",
            "evaluate before registering (`lmforge run` does both) or set registry.policy.metric to a logged metric",
        )
    held = str(champion.version) if champion is not None else None
    champion_metrics = dict(client.get_run(champion.run_id).data.metrics) if champion is not None else None
    verdict = judge(policy, version, metrics, held, champion_metrics)
    verdict = Verdict(verdict.passed, verdict.rule, f"{note}{verdict.reason}", verdict.guardrails)
    facts = {"version": version, "champion_version": held, "candidate_value": metrics.get(policy.metric),
             "champion_value": None if champion_metrics is None else champion_metrics.get(policy.metric)}
    return policy, verdict, facts


def _record(client: Any, cfg: RegistryConfig, ws: Workspace, facts: dict[str, Any], policy: PolicyConfig,
            verdict: Verdict, outcome: str, reason: str, approval: dict[str, Any] | None = None) -> PromotionDecision:
    """Move the alias when promoted, write the decision on the version, refresh its card."""
    name, version, previous = cfg.model_name, facts["version"], facts["champion_version"]
    if outcome == PROMOTED:
        client.set_registered_model_alias(name, cfg.alias, version)
        record_move(client, name, cfg.alias, version, previous, by=verdict.rule)
    guardrails = [g.as_dict() for g in verdict.guardrails]
    tags = {
        "decision": outcome, "promoted": str(outcome == PROMOTED).lower(), "rule": verdict.rule, "reason": reason,
        "metric": policy.metric, "direction": policy.direction, "margin": str(policy.margin),
        "candidate_value": _num(facts["candidate_value"]), "champion_value": _num(facts["champion_value"]),
        "compared_to": previous or "", "decided_at": now(), "guardrails": json.dumps(guardrails),
        "approval": json.dumps(approval) if approval else "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, f"{TAG}{key}", value[:5000])
    card = publish_card(client, name, version)
    decision = PromotionDecision(
        promoted=outcome == PROMOTED, decision=outcome, rule=verdict.rule, reason=reason, alias=cfg.alias, name=name,
        metric=policy.metric, candidate_version=version, champion_version=version if outcome == PROMOTED else previous,
        previous_champion_version=previous, candidate_value=facts["candidate_value"],
        champion_value=facts["champion_value"], guardrails=guardrails, approval=approval, card=card,
    )
    ws.write_state("promote", decision.as_dict())
    return decision


def comparable_policy(policy: PolicyConfig, client: Any, candidate: Any, champion: Any) -> tuple[PolicyConfig, str]:
    """The policy to apply, with a note when its deciding metric differs from ``policy.metric``.

    Per-token loss and perplexity count tokens, so they compare two models only when both cut the
    text into the same tokens: when the tokenizer fingerprints on the two versions differ (or one is
    unknown), the gate compares bits per byte, which divides by bytes instead. It does not always do
    so because, with one tokenizer on one frozen set, both metrics order the candidates the same way
    and the margin the user set (registry.policy.margin) is stated in the configured metric's units.
    """
    if policy.metric not in PER_TOKEN_METRICS or champion is None or str(champion.version) == str(candidate.version):
        return policy, ""
    tokenizers = (candidate.tags.get(TAG_TOKENIZER), champion.tags.get(TAG_TOKENIZER))
    note = ""
    if candidate.tags.get(TAG_DIGEST) != champion.tags.get(TAG_DIGEST):
        note = "evaluation sets differ (or one is unknown), so the numbers describe different text; "
    if tokenizers[0] is not None and tokenizers[0] == tokenizers[1]:
        return policy, note
    if any(run_metric(client, v.run_id, EVAL_BITS_PER_BYTE) is None for v in (candidate, champion)):
        # Versions registered before bits per byte existed: the configured metric is all there is.
        known = None not in tokenizers
        return policy, f"{note}tokenizers differ but a version has no {EVAL_BITS_PER_BYTE}; " if known else note
    switched = policy.model_copy(update={"metric": EVAL_BITS_PER_BYTE, "direction": "min"})
    return switched, (f"{note}tokenizers differ ({tokenizers[0]} vs {tokenizers[1]}): "
                      f"compared {EVAL_BITS_PER_BYTE}, not {policy.metric}; ")


def _num(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.10g}"


def _holder(champion_version: str | None) -> str:
    return f"v{champion_version}" if champion_version else "no champion"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): the approval still needs a name
        return "unknown"
