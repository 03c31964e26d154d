"""`lmforge run` on an object-store workspace, end to end: ``LMFORGE_HOME=s3://bucket/prefix`` on an
S3-compatible server (moto on loopback, found through AWS_ENDPOINT_URL as MinIO would be), run from a
directory that is not the workspace, with a real Prefect server, MLflow and a local Ray whose two
training workers read the data through the cache and report checkpoints to the bucket. Every output
of every stage is an object in the bucket; on local disk there is only the cache (copies keyed by
content digest, and the workspace's local side: Ray's temporary files, MLflow's own database and the
model the local inference server loads).
Slow (a whole pipeline): CI's slow tier."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import BIN, REPO
from fixtures.collect.s3 import SECRET, bucket_keys, client, s3_server

from lmforge.core.storage import MARKER
from lmforge.core.workspace import Workspace

BUCKET = "lmforge-pipeline"
PREFIX = "teams/nlp"
TINY = str(REPO / "configs" / "tiny.yaml")


def _keys(s3c) -> set[str]:
    return set(bucket_keys(s3c, BUCKET, PREFIX))


@pytest.mark.slow
def test_lmforge_run_on_s3_keeps_every_output_in_the_bucket(tmp_path, prefect_server, monkeypatch):
    with s3_server() as endpoint:
        s3c = client(endpoint)
        s3c.create_bucket(Bucket=BUCKET)
        cwd, cache = tmp_path / "elsewhere", tmp_path / "cache"
        cwd.mkdir()
        url = f"s3://{BUCKET}/{PREFIX}"
        env = {**os.environ, "LMFORGE_HOME": url, "LMFORGE_CACHE": str(cache), "AWS_ENDPOINT_URL": endpoint,
               "PREFECT_API_URL": prefect_server}
        try:
            done = subprocess.run([str(BIN / "lmforge"), "run", TINY, "--json"], cwd=cwd, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
            assert SECRET not in done.stdout + done.stderr
            summary = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
            assert summary["version"] == "1" and summary["promoted"]["promoted"] is True

            keys = _keys(s3c)
            run = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{PREFIX}/state/train.json")["Body"].read())["run_id"]
            for committed in ("data/curated", "data/validation", "data/sft", "tokenizer", f"runs/{run}"):
                assert f"{committed}/{MARKER}" in keys, committed
            digest = json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{PREFIX}/data/tokenized/latest.json")["Body"]
                                .read())["digest"]
            assert f"data/tokenized/{digest}/{MARKER}" in keys
            assert {f"runs/{run}/model/config.json", f"runs/{run}/train_result.json", "state/train.json",
                    "state/evaluate.json", "state/register.json"} <= keys
            assert any(k.startswith("mlflow-artifacts/") and k.endswith(".safetensors") for k in keys)  # the version
            assert not any(k.startswith(("ray/train/", f"checkpoints/{run}")) for k in keys)  # done: removed
            assert not any(".tmp" in k for k in keys)

            # Locally: nothing in the working directory; outputs exist only as cache entries.
            assert list(cwd.iterdir()) == []
            assert {p.name for p in tmp_path.iterdir()} == {"elsewhere", "cache"}
            monkeypatch.setenv("LMFORGE_CACHE", str(cache))
            side = Workspace.from_env(url).home
            # The one exception: the model the local inference server loads, downloaded from the registry.
            outputs = [p.relative_to(side).as_posix() for p in side.rglob("*")
                       if p.is_file() and p.suffix in (".parquet", ".safetensors", ".arrow")] if side.exists() else []
            assert all(path.startswith("serving/models/") for path in outputs), outputs
        finally:
            subprocess.run([str(BIN / "lmforge"), "deploy", TINY, "--stop"], cwd=cwd, env=env, capture_output=True,
                           timeout=120)
