"""Any LoRA adapter that records its base (``lmforge_base.json``, written by the register stage) is checked against
the served weights when it is read, wherever it comes from: the start-up ``serving.adapters``, a directory under
``serving.lora.adapter_roots`` or the registry (``serving/adapters/lora_slots.read_adapter``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.core.errors import ServingError
from lmforge.serving.adapters.lora_slots import read_adapter
from lmforge.tracking.adapter_base import BASE_FILE, write_base_record


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base directory and a LoRA adapter directory (with the record of that base) made from it."""
    root = tmp_path_factory.mktemp("adapter-base")
    base_dir, adapter_dir = root / "base", root / "adapter"
    _llama(0).save_pretrained(base_dir)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter_dir)
    write_base_record(base_dir, adapter_dir / BASE_FILE, "base")
    return base_dir, adapter_dir


def test_an_adapter_reads_over_the_base_it_records(trained: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = trained
    adapter = read_adapter("mine", adapter_dir, LlamaForCausalLM.from_pretrained(base_dir))
    assert (0, "q_proj") in adapter.weights


def test_an_adapter_over_another_base_is_refused_naming_what_the_client_sent(trained: tuple[Path, Path]) -> None:
    _, adapter_dir = trained
    with pytest.raises(ServingError) as refused:
        read_adapter("mine", adapter_dir, _llama(1), source="adapters/mine")
    message = str(refused.value)
    assert "'adapters/mine' was trained on another base" in message and "trained on base" in message
    assert "serve the base this adapter was trained on" in refused.value.fix


def test_an_adapter_without_a_record_is_checked_by_shape_only(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, adapter_dir = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in adapter_dir.iterdir():
        if file.name != BASE_FILE:
            (bare / file.name).write_bytes(file.read_bytes())
    assert (0, "q_proj") in read_adapter("bare", bare, _llama(1)).weights
