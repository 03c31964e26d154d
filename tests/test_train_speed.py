"""The training engine's speed switches compute what the plain path computes, and refuse what cannot run.

Real runs of :func:`lmforge.train.loop.train_phase` on a tiny Llama on the CPU: the whole objective
compiled by ``torch.compile`` (``training.compile_scope: model``, inductor's C++ backend here)
against the same steps eagerly. The GPU speed of each switch is measured by bench/train_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.config.stages import ModelConfig, PhaseConfig, TrainingConfig
from lmforge.errors import ConfigError
from lmforge.model import build_model
from lmforge.train.data import batch_stream
from lmforge.train.loop import train_phase
from lmforge.train.speed import attention_kernels

MODEL = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=32)
PHASE = PhaseConfig(steps=6, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=1)


def _losses(**settings) -> list[float]:
    torch.manual_seed(0)
    model = build_model(MODEL, 300)
    ids = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(1))
    rows = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    training = TrainingConfig(method="pretrain", use_ray=False, log_every=1, cpu_threads=1, **settings)
    history, _ = train_phase(model, "pretrain", PHASE, training, batch_stream(rows, 4, seed=0), [],
                             torch.device("cpu"))
    return [row["loss"] for row in history]


@pytest.mark.slow  # ~30 s of C++ compilation on two cores; the scope exists for GPUs
def test_whole_objective_compiled_gives_the_eager_losses():
    eager = _losses()
    compiled = _losses(compile=True, compile_scope="model")
    assert len(compiled) == len(eager) == PHASE.steps
    assert compiled[-1] < compiled[0]  # it learns
    # Same float32 arithmetic; the compiler only reorders sums (fused kernels), so ~1e-6 apart.
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_liger_loss_kernel_on_cpu_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        _losses(loss_kernel="liger")
    assert "only on CUDA" in err.value.cause and "loss_kernel: torch" in err.value.fix


def test_attention_kernel_choice_is_a_no_op_on_cpu():
    with attention_kernels("cudnn", torch.device("cpu")):
        out = torch.nn.functional.scaled_dot_product_attention(*torch.randn(3, 1, 2, 4, 8), is_causal=True)
    assert out.shape == (1, 2, 4, 8)
