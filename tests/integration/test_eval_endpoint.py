"""lm-evaluation-harness tasks against our real OpenAI-compatible server on loopback (``local-completions``):
the same loglikelihoods as in-process, and the scores on the served version's MLflow run."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import served as serving_on_loopback
from tiny_assets import build_model_dir

from lmforge.config.evaluation import EvaluationConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.serving import ServingConfig
from lmforge.core.workspace import Workspace
from lmforge.evaluation.harness import run_tasks
from lmforge.evaluation.scoring import load_model
from lmforge.serving.engine.metrics import EngineMetrics
from lmforge.stages.evaluate import evaluate_endpoint
from lmforge.stages.register import register
from lmforge.tracking.mlflow_tracker import mlflow_client
from lmforge.tracking.model_uris import resolve_model

ROWS = [
    {"question": "What does `abs` do?", "answer": "Return the absolute value of a number."},
    {"question": "What does `len` do?", "answer": "Return the number of items in a container."},
    {"question": "What does `sorted` do?", "answer": "Return a new sorted list from the items in iterable."},
]


@pytest.fixture(autouse=True)
def _no_global_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def write_loglikelihood_task(folder):
    """A loglikelihood task: its perplexity metric is a continuous number, so two scorers can be compared."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_ll.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    task = folder / "tiny_ll.yaml"
    task.write_text(textwrap.dedent(f"""\
        task: tiny_ll
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {data}}}}}
        test_split: test
        output_type: loglikelihood
        doc_to_text: "{{{{question}}}}"
        doc_to_target: " {{{{answer}}}}"
        metric_list:
          - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
        metadata: {{version: 1.0}}
        """))
    return task


def test_endpoint_tasks_match_in_process_and_reach_mlflow(tmp_path):
    ws = Workspace(tmp_path / "home").ensure()
    task = write_loglikelihood_task(tmp_path / "tasks")
    registered = register(RegistryConfig(model_name="served", experiment="tests"), PlatformConfig(), ws,
                          model_dir=build_model_dir(tmp_path / "model"), params={}, metrics={"eval_loss": 5.0},
                          history=[], dataset_inputs=[], tags={})
    model_dir, _, _ = resolve_model(registered.model_uri, ws)
    cfg = EvaluationConfig(tasks=[str(task)], batch_size=2)
    with serving_on_loopback(model_dir, ServingConfig(), metrics=EngineMetrics()) as (url, _, _):
        deployed = {"endpoint": url, "model_name": "tiny", "model_ref": registered.model_uri}
        served = evaluate_endpoint(cfg, deployed, ws)

    model, tokenizer = load_model(model_dir)
    local = run_tasks(model, tokenizer, [str(task)], batch_size=2, max_length=128, limit=None)
    assert served["tasks"]["tiny_ll"]["perplexity"] == pytest.approx(local["tiny_ll"]["perplexity"], rel=1e-3)
    assert served["tasks"]["tiny_ll"]["acc"] == local["tiny_ll"]["acc"]

    client = mlflow_client(ws)
    logged = client.get_run(registered.run_id).data.metrics
    assert logged["endpoint/tiny_ll/perplexity"] == pytest.approx(served["tasks"]["tiny_ll"]["perplexity"])
    artifacts = {a.path for a in client.list_artifacts(registered.run_id, "evaluation")}
    assert f"evaluation/endpoint-served-v{registered.version}-tasks.csv" in artifacts
    assert ws.read_state("evaluate_endpoint")["version"] == registered.version
