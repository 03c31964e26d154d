"""lm-evaluation-harness tasks from local task YAML files, run in-process by the evaluate stage."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest

from lmforge.config.evaluation import EvaluationConfig
from lmforge.core.errors import ConfigError
from lmforge.evaluation.harness import scores_from_results, task_metrics
from lmforge.stages.evaluate import evaluate

ROWS = [
    {"question": "What does `abs` return?", "choices": ["the absolute value of a number", "a sorted list"], "label": 0},
    {"question": "What does `len` return?", "choices": ["a JSON string", "the number of items in a container"], "label": 1},
    {"question": "What does `sorted` return?", "choices": ["a new sorted list", "a file object"], "label": 0},
]


def write_task(folder, name="tiny_mc"):
    """A multiple-choice task whose data is a local JSONL file (no hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    task = folder / f"{name}.yaml"
    task.write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: {data}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list:
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
          - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
        metadata: {{version: 1.0}}
        """))
    return task


def test_task_scores_reach_result_metrics_and_table(model_dir, ws, tmp_path):
    task = write_task(tmp_path / "tasks")
    write_task(tmp_path / "more", name="other_mc")
    cfg = EvaluationConfig(max_batches=1, batch_size=4, block_size=32, max_examples=1, max_new_tokens=2,
                           tasks=[str(task), str(tmp_path / "more")])
    result = evaluate(cfg, model_dir, ws, model_name="harness-demo")

    assert set(result.tasks) == {"tiny_mc", "other_mc"}
    scores = result.tasks["tiny_mc"]
    assert {"acc", "acc_norm"} <= set(scores) and 0.0 <= scores["acc"] <= 1.0
    # A 3-question task scores in thirds.
    assert round(scores["acc"] * 3) == pytest.approx(scores["acc"] * 3)
    assert result.metrics["task/tiny_mc/acc"] == scores["acc"]
    with open(result.tasks_table) as fh:
        rows = list(csv.DictReader(fh))
    assert {"task": "tiny_mc", "metric": "acc", "value": repr(scores["acc"])} in rows
    assert json.loads(Path(result.report_path).read_text())["tasks"] == result.tasks
    assert ws.read_state("evaluate")["tasks"] == result.tasks


def test_missing_task_path_is_a_config_error(model_dir, ws, tmp_path):
    cfg = EvaluationConfig(max_batches=1, max_examples=1, max_new_tokens=2, tasks=[str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match=r"nope\.yaml is neither a task YAML file nor a directory"):
        evaluate(cfg, model_dir, ws)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no lm-evaluation-harness task"):
        evaluate(cfg.model_copy(update={"tasks": [str(tmp_path / "empty")]}), model_dir, ws)


def test_result_table_parsing_and_mlflow_names():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1.0},
               "g, odd": {"acc,none": 0.25}}
    scores = scores_from_results(results)
    assert scores == {"g, odd": {"acc": 0.25}, "t": {"acc": 0.5, "exact_match_strict-match": 1.0}}
    assert task_metrics(scores) == {"task/g_ odd/acc": 0.25, "task/t/acc": 0.5, "task/t/exact_match_strict-match": 1.0}
