"""Fixtures the evaluation tests share: a tiny random Llama directory and a workspace holding
held-out documents and SFT records in the pipeline's formats (tests/tiny_assets.py)."""

from __future__ import annotations

import pytest
from tiny_assets import build_model_dir, write_workspace_data

from lmforge.core.workspace import Workspace


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama (and its tokenizer) saved as the pipeline saves models; read-only."""
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def ws(tmp_path):
    """A fresh workspace with curated/validation.parquet and sft/{train,test}.jsonl."""
    ws = Workspace(tmp_path / "home").ensure()
    write_workspace_data(ws)
    return ws
