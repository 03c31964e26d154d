"""The promotion policy's arithmetic, its config (and the keys that moved into it), and the model card's text."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.config import load_config
from lmforge.config.loader import parse_config
from lmforge.config.registry import Guardrail, PolicyConfig
from lmforge.core.errors import ConfigError
from lmforge.core.report import promote_summary
from lmforge.tracking.card import CardFacts, render_card
from lmforge.tracking.policy import (
    RULE_CHAMPION_UNUSABLE,
    RULE_FIRST,
    RULE_GUARDRAIL,
    RULE_INVALID,
    RULE_METRIC,
    RULE_UNCHANGED,
    check_guardrail,
    judge,
)

ROUGE = Guardrail(metric="eval_rouge_l", direction="max", max_regression=0.05)  # may drop 5% of the champion's
LOSS = Guardrail(metric="eval_loss", max_regression=0.1, kind="absolute")  # may rise by 0.1
POLICY = PolicyConfig(metric="eval_perplexity", margin=0.05, guardrails=[ROUGE, LOSS])
CHAMPION = {"eval_perplexity": 100.0, "eval_rouge_l": 0.40, "eval_loss": 4.6}


def test_relative_guardrail_allows_its_tolerance_and_not_more():
    assert check_guardrail(ROUGE, 0.38, 0.40).passed  # exactly 5% lower
    failed = check_guardrail(ROUGE, 0.37, 0.40)
    assert not failed.passed and failed.regression == pytest.approx(0.03)
    assert "0.37" in failed.note and "lower" in failed.note and "5.00% of 0.4" in failed.note
    assert check_guardrail(ROUGE, 0.55, 0.40).passed and check_guardrail(ROUGE, 0.55, 0.40).regression < 0


def test_absolute_guardrail_and_missing_numbers():
    assert check_guardrail(LOSS, 4.7, 4.6).passed
    assert not check_guardrail(LOSS, 4.71, 4.6).passed
    assert not check_guardrail(LOSS, None, 4.6).passed  # the candidate cannot show it held
    assert not check_guardrail(LOSS, math.nan, 4.6).passed
    assert check_guardrail(LOSS, 5.0, None).passed  # nothing to regress from


def test_guardrail_blocks_a_candidate_that_wins_the_deciding_metric():
    candidate = {"eval_perplexity": 80.0, "eval_rouge_l": 0.30, "eval_loss": 4.4}  # 20% better, ROUGE -25%
    verdict = judge(POLICY, "2", candidate, "1", CHAMPION)
    assert not verdict.passed and verdict.rule == RULE_GUARDRAIL
    assert "+20.00%" in verdict.reason and "eval_rouge_l" in verdict.reason and "kept v1" in verdict.reason
    by_metric = {g.metric: g for g in verdict.guardrails}
    assert not by_metric["eval_rouge_l"].passed and by_metric["eval_loss"].passed
    assert (by_metric["eval_rouge_l"].candidate, by_metric["eval_rouge_l"].champion) == (0.30, 0.40)


def test_metric_rule_decides_when_guardrails_hold_or_margin_is_missed():
    good = {"eval_perplexity": 90.0, "eval_rouge_l": 0.39, "eval_loss": 4.65}
    passed = judge(POLICY, "2", good, "1", CHAMPION)
    assert passed.passed and passed.rule == RULE_METRIC and all(g.passed for g in passed.guardrails)
    small = judge(POLICY, "3", {**good, "eval_perplexity": 98.0}, "1", CHAMPION)
    assert not small.passed and small.rule == RULE_METRIC and "+2.00%" in small.reason


def test_first_version_unchanged_invalid_and_unusable_champion():
    first = judge(POLICY, "1", CHAMPION, None, None)
    assert first.passed and first.rule == RULE_FIRST and all(g.passed for g in first.guardrails)
    assert judge(POLICY, "1", CHAMPION, "1", CHAMPION).rule == RULE_UNCHANGED
    invalid = judge(POLICY, "2", {"eval_perplexity": math.nan}, "1", CHAMPION)
    assert not invalid.passed and invalid.rule == RULE_INVALID
    unusable = judge(POLICY, "2", {**CHAMPION, "eval_perplexity": 50.0}, "1", {**CHAMPION, "eval_perplexity": math.nan})
    assert unusable.passed and unusable.rule == RULE_CHAMPION_UNUSABLE
    higher = PolicyConfig(metric="eval_rouge_l", direction="max", margin=0.0)
    assert judge(higher, "2", {"eval_rouge_l": 0.5}, "1", CHAMPION).passed


def test_policy_config_and_moved_keys():
    config = parse_config({"registry": {"policy": {
        "metric": "eval_bits_per_byte", "margin": 0.02,
        "guardrails": [{"metric": "eval_rouge_l", "direction": "max", "max_regression": 0.01}],
        "approval": {"enabled": True, "timeout_s": 600}}}})
    policy = config.registry.policy
    assert policy.guardrails[0].kind == "relative" and policy.approval.timeout_s == 600
    with pytest.raises(ConfigError) as err:
        parse_config({"registry": {"metric": "eval_loss", "min_improvement": 0.02}}, "old.yaml")
    assert "registry.metric is now registry.policy.metric" in err.value.fix
    assert "registry.min_improvement is now registry.policy.margin" in err.value.fix
    with pytest.raises(ConfigError, match="more than once"):
        parse_config({"registry": {"policy": {"guardrails": [{"metric": "a"}, {"metric": "a"}]}}})
    with pytest.raises(ConfigError, match=r"guardrails\.0\.kind"):
        parse_config({"registry": {"policy": {"guardrails": [{"metric": "a", "kind": "percent"}]}}})
    assert load_config().registry.policy.approval.enabled is False


def test_model_card_shows_lineage_training_metrics_tasks_and_decision():
    guard = check_guardrail(ROUGE, 0.30, 0.40).as_dict()
    facts = CardFacts(
        name="demo", version="3", run_id="r123",
        params={"model.base_model": "", "model.architecture": "llama", "training.method": "lora",
                "training.finetune.steps": "40", "training.finetune.learning_rate": "0.0003",
                "training.pretrain.steps": "0", "training.lora.r": "8", "config_hash": "abc"},
        metrics={"eval_perplexity": 90.5, "eval_bits_per_byte": 3.2, "task/tiny_mc/acc": 0.75, "loss": 4.0},
        version_tags={"lmforge.data.curated-corpus.digest": "d1g3st", "lmforge.eval.frozen_set": "fr0zen",
                      "lmforge.promotion.decision": "rejected", "lmforge.promotion.rule": "guardrail",
                      "lmforge.promotion.reason": "ROUGE fell", "lmforge.promotion.guardrails": json.dumps([guard])},
        architecture={"model_type": "llama", "num_hidden_layers": 2},
        manifest={"sft": {"train": 9, "test": 1, "sources": {"local[0]": {"read": 11, "skipped": 1}}}},
    )
    card = render_card(facts)
    assert card.startswith("# demo v3\n")
    for text in ("none (built from config)", "config.json num_hidden_layers | 2", "curated-corpus digest | `d1g3st`",
                 "| local[0] | 11 | 1 |", "finetune steps | 40", "finetune learning rate | 0.0003", "lora r | 8",
                 "eval_perplexity | 90.5", "| tiny_mc/acc | 0.75 |", "frozen set digest | `fr0zen`",
                 "decision | rejected", "rule | guardrail", "| eval_rouge_l | 0.3 | 0.4 | 0.05 relative | no |"):
        assert text in card, text
    assert "pretrain steps" not in card and "| loss |" not in card


def test_run_summary_promote_block():
    guard = check_guardrail(LOSS, 4.7, 4.6).as_dict()
    decision = {"promoted": False, "decision": "pending", "rule": "metric", "metric": "eval_perplexity",
                "candidate_value": 90.0, "champion_value": 100.0, "guardrails": [guard], "approval": None,
                "card": {"artifact": "runs:/r/model_card.md"}}
    summary = promote_summary(decision)
    assert summary["decision"] == "pending" and summary["rule"] == "metric"
    assert summary["guardrails"] == [{"metric": "eval_loss", "candidate": 4.7, "champion": 4.6, "tolerance": 0.1,
                                      "kind": "absolute", "passed": True}]
    assert promote_summary({"promoted": True})["decision"] == "promoted"  # a decision from before the policy
