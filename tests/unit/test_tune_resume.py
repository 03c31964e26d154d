"""Which stopped search `lmforge tune CONFIG --resume [TUNE_ID]` continues, and the refusals that name the
fix (no stopped search, an id that is not one, a search that ended, a config that changed); no Ray."""

from __future__ import annotations

import pytest

from lmforge.config import parse_config
from lmforge.core.errors import ConfigError
from lmforge.core.workspace import Workspace
from lmforge.tune.resume import LATEST, RESULT, SEARCH, record_start, resumable

SPACE = {"tune": {"space": {"training.pretrain.learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}}}}


def _raw(**tune: object) -> dict:
    return parse_config({"tune": {**SPACE["tune"], **tune}}, "test").model_dump(mode="json")


def test_latest_is_the_newest_stopped_search(tmp_path):
    ws = Workspace(tmp_path / "home")
    tune_dir = ws.home / "tune"
    raw = _raw()
    for tune_id in ("tune-a", "tune-b", "tune-c"):
        record_start(ws, tune_dir / tune_id, tune_id, raw)
    (tune_dir / "tune-c" / RESULT).write_text("{}")  # c ended; b started after a
    assert (tune_dir / "tune-b" / SEARCH).is_file()
    assert resumable(ws, tune_dir, LATEST, raw) == "tune-b"
    assert resumable(ws, tune_dir, "tune-a", raw) == "tune-a"


@pytest.mark.parametrize("wanted,match,fix", [
    (LATEST, "no stopped search", "lmforge tune CONFIG"),
    ("tune-zzz", "does not exist", "the id of a search this workspace ran"),
    ("../etc", "is not a search id", "pass an id such as"),
    ("tune-done", "that search ended", "without --resume"),
])
def test_refusals_name_the_fix(tmp_path, wanted, match, fix):
    ws = Workspace(tmp_path / "home")
    tune_dir = ws.home / "tune"
    record_start(ws, tune_dir / "tune-done", "tune-done", _raw())
    (tune_dir / "tune-done" / RESULT).write_text("{}")
    with pytest.raises(ConfigError, match=match) as info:
        resumable(ws, tune_dir, wanted, _raw())
    assert fix in info.value.fix


def test_a_changed_search_is_refused(tmp_path):
    ws = Workspace(tmp_path / "home")
    tune_dir = ws.home / "tune"
    record_start(ws, tune_dir / "tune-a", "tune-a", _raw())
    with pytest.raises(ConfigError, match="tune section") as info:
        resumable(ws, tune_dir, "tune-a", _raw(max_trials=3))
    assert "search.json" in info.value.fix
    # Sections a trial's config is not built from may differ (another serving port, another registry name).
    other = _raw()
    other["serving"]["max_new_tokens"] = 7
    assert resumable(ws, tune_dir, "tune-a", other) == "tune-a"
