"""A workspace on an S3-compatible server (moto on loopback, found through AWS_ENDPOINT_URL as a
user's MinIO would be): `lmforge collect`, `curate` and `validate` run as a user runs them, from a
directory that is not the workspace, and every output is a committed object in the bucket while
nothing of the workspace lands on local disk outside the cache; a wrong LMFORGE_HOME fails first."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN
from fixtures.collect.s3 import SECRET, bucket_keys, client, s3_server

from lmforge.core.storage import MARKER
from lmforge.core.workspace import Workspace

BUCKET = "lmforge-stages"
PREFIX = "team/ws"
CONFIG = {"data": {"sources": [{"type": "stdlib", "max_bytes": 40000}], "instructions": {"max_records": 60},
                   "progress_interval_s": 0},
          "validation": {"min_documents": 5}}


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        s3c = client(endpoint)
        s3c.create_bucket(Bucket=BUCKET)
        yield endpoint, s3c


def _lmforge(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmforge"), *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _keys(s3c, prefix: str) -> list[str]:
    return bucket_keys(s3c, BUCKET, prefix)


@pytest.fixture(scope="module")
def staged(s3, tmp_path_factory):
    """collect, curate and validate run once into the bucket, as a user runs them from elsewhere."""
    endpoint, _ = s3
    tmp = tmp_path_factory.mktemp("s3ws")
    cwd, cache = tmp / "elsewhere", tmp / "cache"
    cwd.mkdir()
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    url = f"s3://{BUCKET}/{PREFIX}"
    env = {"LMFORGE_HOME": url, "LMFORGE_CACHE": str(cache), "AWS_ENDPOINT_URL": endpoint}
    for stage in ("collect", "curate", "validate"):
        done = _lmforge([stage, str(config), "--json"], cwd, env)
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
        assert SECRET not in done.stdout + done.stderr
    return {"url": url, "env": env, "cwd": cwd, "cache": cache, "config": config, "tmp": tmp, "last": done}


def test_collect_curate_validate_on_s3_leave_outputs_only_in_the_bucket(s3, staged, tmp_path, monkeypatch):
    _, s3c = s3
    url, env, cwd, cache, config, done = (staged[k] for k in ("url", "env", "cwd", "cache", "config", "last"))
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # validate's: Data Docs named in the bucket
    assert summary["success"] and summary["data_docs"].startswith(f"{url}/data/validation/gx/")

    keys = _keys(s3c, PREFIX)
    raw = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{PREFIX}/data/raw/manifest.json")["Body"].read())
    assert raw["complete"] and raw["shards"]
    assert {f"data/raw/{s['path']}" for s in raw["shards"]} | {f"data/raw/{u}" for u in raw["units"]} <= set(keys)
    for committed in ("data/curated", "data/validation"):
        assert f"{committed}/{MARKER}" in keys  # the marker is written last: the directory is whole
    assert {"data/curated/train.parquet", "data/curated/validation.parquet", "data/curated/report.json",
            "data/validation/result.json", "data/validation/curated_documents.json",
            "data/sft/train.jsonl", "data/curated-sft/train.jsonl", "data/curated-sft/report.json",
            "data/validation/instruction_records.json"} <= set(keys)  # the SFT set went through every stage too
    for committed in ("data/sft", "data/curated-sft"):
        assert f"{committed}/{MARKER}" in keys
    assert json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{PREFIX}/data/validation/result.json")["Body"].read())["success"]
    assert not any(".tmp" in k for k in keys)  # no temporary survived a publish

    # A second collect reads its state back from the bucket: nothing is new, no shard is rewritten.
    again = _lmforge(["collect", str(config), "--json"], cwd, env)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["documents_new"] == 0 and result["documents_total"] == raw["documents_total"]
    assert result["raw_dir"] == f"{url}/data/raw"
    assert [k for k in _keys(s3c, PREFIX) if k.startswith("data/raw/docs-")] == \
        [k for k in keys if k.startswith("data/raw/docs-")]

    # A failing gate keeps its results too, committed in the bucket, and the fix names them there.
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({**CONFIG, "validation": {"min_documents": 100000}}))
    failed = _lmforge(["validate", str(strict)], cwd, env)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert f"{url}/data/validation/curated_documents.json" in failed.stderr
    result_key = f"{PREFIX}/data/validation/result.json"
    assert json.loads(s3c.get_object(Bucket=BUCKET, Key=result_key)["Body"].read())["success"] is False

    # Locally: nothing in the working directory; under the cache only its own entries (copies keyed
    # by digest) and the workspace's side, which holds no output.
    assert list(cwd.iterdir()) == []
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))
    side = Workspace.from_env(url).home
    assert side.is_relative_to(cache)
    left = [p.relative_to(side).as_posix() for p in side.rglob("*") if p.is_file()] if side.exists() else []
    assert set(left) <= {"locks/collect.lock"}, left  # collect's lock guards this machine's runs
    assert not any(p.suffix in (".parquet", ".json") for p in cache.rglob("*") if p.is_file()
                   and "objects" not in p.parts and "dirs" not in p.parts and "prefect" not in p.parts)


@pytest.mark.parametrize(("home", "words"), [
    ("s3://no-such-bucket-here/ws", "does not exist"),
    ("ftp2://host/ws", "unknown storage scheme"),
])
def test_bad_storage_settings_fail_before_any_work(s3, tmp_path, home, words):
    endpoint, _ = s3
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    done = _lmforge(["collect", str(config)], tmp_path,
                    {"LMFORGE_HOME": home, "LMFORGE_CACHE": str(tmp_path / "cache"), "AWS_ENDPOINT_URL": endpoint})
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and "Traceback" not in done.stderr
    assert "LMFORGE_HOME" in done.stderr and words in done.stderr and "fix:" in done.stderr
    assert not (tmp_path / "cache" / "homes").exists()  # failed before the workspace was touched


TRAIN = {"model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                   "intermediate_size": 128, "max_seq_len": 64},
         "training": {"method": "lora", "placement": {"use_ray": False}, "cpu_threads": 1,
                      "pretrain": {"steps": 150, "learning_rate": 3e-3, "batch_size": 4, "seq_len": 64},
                      "finetune": {"steps": 4, "learning_rate": 1e-3, "batch_size": 2, "seq_len": 64},
                      "checkpointing": {"every": 10, "every_minutes": 0}, "logging": {"every": 10}}}


@pytest.mark.slow  # tokenize, a killed and a resumed training run: about two minutes on a busy 2-core machine
def test_tokenize_and_train_on_s3_commit_to_the_bucket_and_resume_from_it(s3, staged, tmp_path):
    """tokenize and an in-line train read the bucket through the cache and commit there; a run killed
    after its first checkpoint reached the bucket resumes from it (`lmforge train --resume`)."""
    _, s3c = s3
    url, env, cwd = staged["url"], staged["env"], staged["cwd"]
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, **{k: v for k, v in TRAIN.items() if v}}))
    done = _lmforge(["tokenize", str(config), "--json"], cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    tokenized = json.loads(done.stdout.strip().splitlines()[-1])
    keys = _keys(s3c, PREFIX)
    digest = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{PREFIX}/data/tokenized/latest.json")["Body"].read())["digest"]
    assert {f"tokenizer/{MARKER}", "tokenizer/tokenizer.json", f"data/tokenized/{digest}/{MARKER}",
            f"data/tokenized/{digest}/manifest.json"} <= set(keys)
    assert any(k.startswith(f"data/tokenized/{digest}/pretrain/train/") for k in keys)
    assert url in json.dumps(tokenized)

    # Killed once its first checkpoint is committed in the bucket: nothing of the run is published.
    proc = subprocess.Popen([str(BIN / "lmforge"), "train", str(config)], env={**os.environ, **env}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(k.startswith("checkpoints/") and k.endswith(MARKER) for k in _keys(s3c, PREFIX)):
            assert proc.poll() is None, f"train ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert not any(k.startswith("runs/") and "/model/" in k for k in _keys(s3c, PREFIX))

    done = _lmforge(["train", str(config), "--resume", "--json"], cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < result["resumed_from_step"] < 150
    keys = _keys(s3c, PREFIX)
    run = result["run_id"]
    assert {f"runs/{run}/{MARKER}", f"runs/{run}/model/config.json", f"runs/{run}/adapter/adapter_config.json",
            f"runs/{run}/train_result.json"} <= set(keys)
    assert not any(k.startswith(f"checkpoints/{run}/") for k in keys)  # complete: its checkpoint served its purpose
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_tune_on_s3_keeps_its_results_and_ray_state_in_the_bucket(s3, staged, tmp_path):
    """`lmforge tune` on an s3:// workspace: trials (Ray Tune actors) open the workspace by its URL and
    train in-line from cached copies; best.yaml, result.json and Ray Tune's state land in the bucket."""
    _, s3c = s3
    env, cwd = staged["env"], staged["cwd"]
    config = tmp_path / "tune.yaml"
    tune = {"space": {"training.pretrain.learning_rate": {"choice": [1.0e-3, 3.0e-3]}}, "max_trials": 2,
            "max_concurrent": 1, "scheduler": "none", "resources": {"cpus": 1}}
    training = {**TRAIN["training"], "method": "pretrain", "checkpointing": {"every_minutes": 0},
                "pretrain": {**TRAIN["training"]["pretrain"], "steps": 6}, "validation": {"every": 3, "batches": 1}}
    config.write_text(yaml.safe_dump({**CONFIG, "model": TRAIN["model"], "training": training, "tune": tune}))
    if f"tokenizer/{MARKER}" not in _keys(s3c, PREFIX):
        done = _lmforge(["tokenize", str(config)], cwd, env)
        assert done.returncode == 0, done.stderr[-3000:]
    done = _lmforge(["tune", str(config), "--json"], cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 2 and summary["completed"] == 2
    tune_id = summary["tune_id"]
    assert summary["best_config"] == f"{staged['url']}/tune/{tune_id}/best.yaml"
    keys = _keys(s3c, PREFIX)
    assert {f"tune/{tune_id}/best.yaml", f"tune/{tune_id}/result.json"} <= set(keys)
    assert any(k.startswith(f"ray/tune/{tune_id}/") for k in keys)  # Ray Tune's experiment state
    assert list(cwd.iterdir()) == []
