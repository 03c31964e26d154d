"""The tokenizer stage trains a real byte-level BPE on a small workspace corpus and saves it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import write_corpus

from lmforge.config.model import ModelConfig
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.model.prompt import EOS_TOKEN, PAD_TOKEN, format_prompt
from lmforge.tokenizer.build import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("tok") / "home")
    write_corpus(ws)
    path = train_tokenizer(ModelConfig(vocab_size=384), ws)
    return ws, path, load_tokenizer(path)


def test_tokenizer_is_saved_with_specials(trained):
    ws, path, tok = trained
    assert path == ws.tokenizer_dir and (path / "tokenizer.json").exists()
    assert 258 < len(tok) <= 384  # 256 bytes + 2 specials + merges, capped by vocab_size
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN and tok.bos_token == EOS_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    # Specials are single tokens, never split into bytes.
    assert tok(EOS_TOKEN + PAD_TOKEN, add_special_tokens=False)["input_ids"] == [tok.eos_token_id, tok.pad_token_id]
    assert not list(path.parent.glob(".tokenizer.*"))  # the atomic write left no staging dir


@pytest.mark.parametrize("text", [
    "Serialize ``obj`` to a JSON formatted ``str``.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "naïve café – 日本語 ✓ emoji 🙂",
])
def test_tokenizer_round_trips_text(trained, text):
    _, _, tok = trained
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_tokenizer_compresses_corpus_text(trained):
    _, _, tok = trained
    text = "Return a new dictionary with the keys and values of the object."
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2  # merges were learned


def test_chat_template_matches_training_prompt(trained):
    _, _, tok = trained
    rendered = tok.apply_chat_template([{"role": "user", "content": "What does `len` do?"}],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered == format_prompt("What does `len` do?")
    reloaded = load_tokenizer(trained[1])
    assert reloaded.chat_template == tok.chat_template


def test_missing_corpus_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="curate"):
        train_tokenizer(ModelConfig(), Workspace(tmp_path / "empty"))


def test_missing_tokenizer_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=re.escape("python -m lmforge.train")):
        load_tokenizer(Path(tmp_path))
