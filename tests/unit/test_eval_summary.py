"""`lmforge run --json` carries evaluate.bits_per_byte, evaluate.tasks (in-process and against the served
endpoint) and the frozen set's digest."""

from __future__ import annotations

from lmforge.core.report import run_summary


def test_run_summary_has_the_evaluate_block():
    result = {
        "register": {"name": "m", "version": "2", "metrics": {"eval_bits_per_byte": 1.25}, "run_id": "r"},
        "promote": {"alias": "champion", "champion_version": "2", "promoted": True, "reason": "first"},
        "curate": {"documents_out": 10},
        "collect": {},
        "evaluate": {"metrics": {"eval_bits_per_byte": 1.25, "eval_perplexity": 9.0},
                     "tasks": {"tiny_mc": {"acc": 0.5}}, "frozen_set": {"digest": "abc", "source": "new"}},
        "evaluate_endpoint": {"tasks": {"tiny_mc": {"acc": 0.75}}},
    }
    summary = run_summary(result, "sqlite:///x.db")
    assert summary["evaluate"] == {"bits_per_byte": 1.25, "tasks": {"tiny_mc": {"acc": 0.5}},
                                   "endpoint_tasks": {"tiny_mc": {"acc": 0.75}}, "frozen_set": "abc"}
