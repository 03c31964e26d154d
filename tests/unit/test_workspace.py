"""Workspace: one home per run, atomic writes that never leave half a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.core.workspace import Workspace, atomic_dir, atomic_write_json


def test_home_from_env_and_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "a"))
    assert Workspace.from_env().home == (tmp_path / "a").resolve()
    assert Workspace.from_env(tmp_path / "b").home == (tmp_path / "b").resolve()


PATHS = [name for name, value in vars(Workspace).items() if isinstance(value, property)
         and isinstance(getattr(Workspace(Path("/x")), name), Path)]


def test_two_homes_share_no_path(tmp_path):
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    for name in ("raw_dir", "curated_dir", "tokenizer_dir", "runs_dir", "mlflow_dir", "ray_dir",
                 "prefect_dir", "serving_dir"):
        assert not str(getattr(a, name)).startswith(str(b.home))
    assert a.mlflow_tracking_uri != b.mlflow_tracking_uri


def test_every_location_lies_under_home_and_is_its_own(tmp_path):
    ws = Workspace(tmp_path / "home")
    assert {"checkpoints_dir", "collect_cache_dir", "curated_versions_dir", "tokenized_dir", "logs_dir"} <= set(PATHS)
    locations = [getattr(ws, name) for name in PATHS]
    assert all(path.is_relative_to(ws.home) and path != ws.home for path in locations)
    assert len(set(locations)) == len(locations)


def test_state_roundtrip(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.read_state("train") is None
    ws.write_state("train", {"model_dir": "x", "n": 1})
    assert ws.read_state("train") == {"model_dir": "x", "n": 1}


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp leftovers


def test_atomic_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": 2})
    assert path.read_text().strip().startswith("{") and '"b": 2' in path.read_text()
    assert len(list(tmp_path.iterdir())) == 1


def test_outputs_are_readable_by_other_users(tmp_path):
    atomic_write_json(tmp_path / "x.json", {})
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "x.json").stat().st_mode & 0o044 == 0o044
    assert (tmp_path / "d").stat().st_mode & 0o055 == 0o055


def test_errors_survive_pickling():
    import pickle

    from lmforge.core.errors import TrainingDiverged, ValidationFailed

    err = pickle.loads(pickle.dumps(TrainingDiverged("loss is NaN at step 3", "lower the learning rate")))
    assert err.cause == "loss is NaN at step 3" and err.fix == "lower the learning rate"
    val = pickle.loads(pickle.dumps(ValidationFailed("bad", "fix it", "report", {"a": 1})))
    assert val.report == "report" and val.details == {"a": 1}
