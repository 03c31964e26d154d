"""The promote stage: move the alias (``champion``) to a registered version only by the promotion rule.

Run it with ``lmforge promote CONFIG [VERSION]``; ``lmforge run`` promotes after registering. The
rule and its numbers are written on the version as ``lmforge.promotion.*`` tags.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.core.errors import RegistryError
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen_store import TAG_DIGEST, TAG_TOKENIZER
from lmforge.evaluation.metrics import EVAL_BITS_PER_BYTE, PER_TOKEN_METRICS, relative_improvement
from lmforge.tracking.mlflow_tracker import mlflow_client, run_metric
from lmforge.tracking.model_uris import get_version, version_by_alias


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    alias: str
    name: str
    metric: str
    candidate_version: str
    champion_version: str | None  # holder of the alias after the decision
    previous_champion_version: str | None
    candidate_value: float | None
    champion_value: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def promote(cfg: RegistryConfig, platform: PlatformConfig | None, ws: Workspace, version: str) -> PromotionDecision:
    """Move ``cfg.alias`` to ``version`` if it is the first or beats the champion by the margin."""
    client = mlflow_client(ws, platform)
    name, version = cfg.model_name, str(version)
    candidate = get_version(client, name, version, ws, platform)
    champion = version_by_alias(client, name, cfg.alias)
    cfg, note = _comparable(cfg, client, candidate, champion)
    candidate_value = run_metric(client, candidate.run_id, cfg.metric)
    if candidate_value is None:
        raise RegistryError(
            f"version {version} of {name!r} has no metric {cfg.metric!r}",
            "evaluate before registering (`lmforge run` does both) or set registry.metric to a logged metric",
        )
    previous = str(champion.version) if champion is not None else None
    champion_value = run_metric(client, champion.run_id, cfg.metric) if champion is not None else None
    promoted, reason = _decide(cfg, version, candidate_value, previous, champion_value)
    reason = f"{note}{reason}"
    if promoted:
        client.set_registered_model_alias(name, cfg.alias, version)
    decision = PromotionDecision(
        promoted=promoted,
        reason=reason,
        alias=cfg.alias,
        name=name,
        metric=cfg.metric,
        candidate_version=version,
        champion_version=version if promoted else previous,
        previous_champion_version=previous,
        candidate_value=candidate_value,
        champion_value=champion_value,
    )
    decision_tags = {
        "lmforge.promotion.promoted": str(promoted).lower(),
        "lmforge.promotion.reason": reason,
        "lmforge.promotion.compared_to": previous or "",
        "lmforge.promotion.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in decision_tags.items():
        client.set_model_version_tag(name, version, key, value)
    ws.write_state("promote", decision.as_dict())
    return decision


def _comparable(cfg: RegistryConfig, client: Any, candidate: Any, champion: Any) -> tuple[RegistryConfig, str]:
    """The rule to apply, with a note when it differs from ``cfg``.

    Per-token loss and perplexity count tokens, so they compare two models only when both cut the
    text into the same tokens: when the tokenizer fingerprints on the two versions differ (or one is
    unknown), the gate compares bits per byte, which divides by bytes instead. It does not always do
    so because, with one tokenizer on one frozen set, both metrics order the candidates the same way
    and the margin the user set (registry.min_improvement) is stated in the configured metric's units.
    """
    if cfg.metric not in PER_TOKEN_METRICS or champion is None or str(champion.version) == str(candidate.version):
        return cfg, ""
    tokenizers = (candidate.tags.get(TAG_TOKENIZER), champion.tags.get(TAG_TOKENIZER))
    note = ""
    if candidate.tags.get(TAG_DIGEST) != champion.tags.get(TAG_DIGEST):
        note = "evaluation sets differ (or one is unknown), so the numbers describe different text; "
    if tokenizers[0] is not None and tokenizers[0] == tokenizers[1]:
        return cfg, note
    if any(run_metric(client, v.run_id, EVAL_BITS_PER_BYTE) is None for v in (candidate, champion)):
        # Versions registered before bits per byte existed: the configured metric is all there is.
        known = None not in tokenizers
        return cfg, f"{note}tokenizers differ but a version has no {EVAL_BITS_PER_BYTE}; " if known else note
    switched = cfg.model_copy(update={"metric": EVAL_BITS_PER_BYTE, "mode": "min"})
    return switched, (f"{note}tokenizers differ ({tokenizers[0]} vs {tokenizers[1]}): "
                      f"compared {EVAL_BITS_PER_BYTE}, not {cfg.metric}; ")


def _decide(
    cfg: RegistryConfig, version: str, candidate: float, champion_version: str | None, champion: float | None
) -> tuple[bool, str]:
    """The promotion rule, with a reason that states the numbers either way."""
    label = f"candidate v{version} {cfg.metric}={candidate:.6g}"
    if math.isnan(candidate):
        return False, f"{label} is NaN; kept {_holder(champion_version)}"
    if champion_version is None:
        return True, f"first version: {label}; no {cfg.alias} yet"
    if champion_version == version:
        return False, f"v{version} already holds {cfg.alias} ({cfg.metric}={candidate:.6g})"
    if champion is None or math.isnan(champion):
        return True, f"{label}; champion v{champion_version} has no usable {cfg.metric}, so the measured one wins"
    gain = relative_improvement(candidate, champion, cfg.mode)
    direction = "lower" if cfg.mode == "min" else "higher"
    comparison = (
        f"{label} vs champion v{champion_version} {champion:.6g}: {gain:+.2%} "
        f"({direction} is better; needs at least +{cfg.min_improvement:.2%})"
    )
    if gain > 0 and gain >= cfg.min_improvement:
        return True, f"{comparison}; promoted"
    return False, f"{comparison}; kept v{champion_version}"


def _holder(champion_version: str | None) -> str:
    return f"v{champion_version}" if champion_version else "no champion"
