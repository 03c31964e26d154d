"""The checkpoint format marker and its two load paths, in this process (no process group: DCP then
reads and writes as one rank), on a tiny Llama after a real AdamW step.

A sharded checkpoint (``format: sharded``, the weights and optimizer state in DCP's safetensors shards)
and a full one (``format: full``, or no marker: written before sharded checkpoints existed) both restore
weights, optimizer state and generators exactly; a checkpoint of another model shape fails with a
ConfigError naming what differs, before any weight changes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmforge.config.model import ModelConfig
from lmforge.core.errors import ConfigError
from lmforge.model.build import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train import sharded_checkpoint
from lmforge.train.loop import adamw

VOCAB = 256
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    max_seq_len=16)


def _trained(model_cfg: ModelConfig = MODEL) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(model_cfg, VOCAB)
    optimizer = adamw(model, 1e-2, 0.1, torch.device("cpu"))
    ids = torch.randint(0, VOCAB, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _written(tmp_path: Path, shards: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, ckpt.Checkpoint, tuple]:
    """The trained model and optimizer, their checkpoint, and the generators' next draws after it."""
    model, optimizer = _trained()
    groups, meta = ckpt.capture(model, optimizer, shards)
    written = ckpt.save(tmp_path / "ckpt", "pretrain-0000001", groups, {"loop": meta}, keep=1)
    assert written is not None
    draws = (torch.rand(3), random.random())  # the generators move on: restoring must bring them back
    return model, optimizer, ckpt.load_latest(written.parent), draws


@pytest.mark.parametrize("shards", [True, False], ids=["sharded", "full"])
def test_either_format_restores_weights_optimizer_and_generators(tmp_path, shards):
    model, optimizer, saved, draws = _written(tmp_path, shards)
    assert saved.sharded == shards
    assert json.loads((saved.path / "state.json").read_text())["format"] == ("sharded" if shards else "full")
    assert (saved.path / sharded_checkpoint.DCP_DIR).is_dir() == shards
    torch.manual_seed(1)  # another start: weights, state and generators all come from the checkpoint
    fresh = build_model(MODEL, VOCAB)
    fresh_opt = adamw(fresh, 1e-2, 0.1, torch.device("cpu"))
    ckpt.restore(saved, fresh, fresh_opt)
    torch.testing.assert_close(torch.rand(3), draws[0], rtol=0, atol=0)
    assert random.random() == draws[1]
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fresh_opt.state[q][key], optimizer.state[p][key], rtol=0, atol=0)


def test_a_checkpoint_without_a_format_marker_is_a_full_one(tmp_path):
    """Checkpoints written before the marker existed load as full ones."""
    model, _, saved, _ = _written(tmp_path, shards=False)
    state = json.loads((saved.path / "state.json").read_text())
    del state["format"]
    (saved.path / "state.json").write_text(json.dumps(state))
    old = ckpt.load_latest(saved.path.parent)
    assert not old.sharded
    fresh = build_model(MODEL, VOCAB)
    ckpt.restore(old, fresh, adamw(fresh, 1e-2, 0.1, torch.device("cpu")))
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("shards", [True, False], ids=["sharded", "full"])
def test_a_checkpoint_of_another_model_shape_fails_with_the_fix(tmp_path, shards):
    _, _, saved, _ = _written(tmp_path, shards)
    wider = MODEL.model_copy(update={"intermediate_size": 96})
    model = build_model(wider, VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"(does|do) not fit this model") as err:
        ckpt.restore(saved, model, adamw(model, 1e-2, 0.1, torch.device("cpu")))
    assert "mlp" in err.value.cause and "training.method" in err.value.fix
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)  # nothing half-loaded


def test_a_sharded_checkpoint_without_its_shards_fails_with_the_fix(tmp_path):
    _, _, saved, _ = _written(tmp_path, shards=True)
    for path in (saved.path / sharded_checkpoint.DCP_DIR).iterdir():
        path.unlink()
    model = build_model(MODEL, VOCAB)
    with pytest.raises(ConfigError, match="holds no weights") as err:
        ckpt.restore(saved, model, adamw(model, 1e-2, 0.1, torch.device("cpu")))
    assert "earlier one" in err.value.fix
