"""The training engine's speed switches compute what the plain path computes, and refuse what cannot run.

Real runs of :func:`lmforge.train.loop.train_phase` on a tiny Llama on the CPU: the whole objective
compiled by ``torch.compile`` (``training.speed.compile_scope: model``, inductor's C++ backend here)
against the same steps eagerly. FlashAttention-4 and FP8 kernels run only on GPUs: here their
refusals, the custom ops' shape functions and GPT-2's layout round trip for FP8; their numbers and
speed are checked on an H100 by bench/attention_gpu.py and bench/train_gpu.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from lmforge.config.model import ModelConfig
from lmforge.config.training import (
    CheckpointingConfig,
    LoggingConfig,
    LossConfig,
    PhaseConfig,
    PlacementConfig,
    SpeedConfig,
    TrainingConfig,
)
from lmforge.core.errors import ConfigError
from lmforge.model.build import build_model
from lmforge.train.accel import flash4, fp8, speed
from lmforge.train.accel.speed import attention_kernels, set_attention_backend
from lmforge.train.data import batch_stream
from lmforge.train.loop import train_phase

MODEL = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=32)
PHASE = PhaseConfig(steps=6, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=1)


def _losses(**groups) -> list[float]:
    torch.manual_seed(0)
    model = build_model(MODEL, 300)
    ids = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(1))
    rows = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    training = TrainingConfig(method="pretrain", placement=PlacementConfig(use_ray=False),
                              logging=LoggingConfig(every=1), cpu_threads=1, **groups)
    history, _ = train_phase(model, "pretrain", PHASE, training, batch_stream(rows, 4, seed=0), [],
                             torch.device("cpu"))
    return [row["loss"] for row in history]


@pytest.mark.slow  # ~30 s of C++ compilation on two cores; the scope exists for GPUs
def test_whole_objective_compiled_gives_the_eager_losses():
    eager = _losses()
    compiled = _losses(speed=SpeedConfig(compile=True, compile_scope="model"))
    assert len(compiled) == len(eager) == PHASE.steps
    assert compiled[-1] < compiled[0]  # it learns
    # Same float32 arithmetic; the compiler only reorders sums (fused kernels), so ~1e-6 apart.
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_liger_loss_kernel_on_cpu_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        _losses(loss=LossConfig(kernel="liger"))
    assert "only on CUDA" in err.value.cause and "loss.kernel: torch" in err.value.fix


def test_attention_kernel_choice_is_a_no_op_on_cpu():
    with attention_kernels("cudnn", torch.device("cpu")):
        out = torch.nn.functional.scaled_dot_product_attention(*torch.randn(3, 1, 2, 4, 8), is_causal=True)
    assert out.shape == (1, 2, 4, 8)


def test_flash_attention_4_on_cpu_is_refused_with_the_fix():
    model = build_model(MODEL, 300)
    with pytest.raises(ConfigError) as err:
        set_attention_backend(model, "fa4", torch.device("cpu"))
    assert "Hopper or Blackwell" in err.value.cause and "attention_backend: auto" in err.value.fix
    assert model.config._attn_implementation == "sdpa"  # left as it was


def test_flash_attention_4_ops_give_shapes_without_running_a_kernel():
    # The compiler plans a whole-model graph from these shape-only versions (meta tensors run no kernel).
    q = torch.empty(2, 16, 4, 64, device="meta")
    kv = torch.empty(2, 16, 2, 64, device="meta")
    out, lse = flash4.fa4_forward(q, kv, kv, True, 0.125)
    assert out.shape == (2, 16, 4, 64) and lse.shape == (2, 4, 16) and lse.dtype == torch.float32
    grads = flash4.fa4_backward(out, q, kv, kv, out, lse, True, 0.125)
    assert [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]


def test_speed_settings_that_cannot_combine_are_refused_by_the_config():
    with pytest.raises(ValueError, match="compile_scope: model"):
        TrainingConfig(method="pretrain", speed=SpeedConfig(cuda_graphs=True))
    with pytest.raises(ValueError, match="method pretrain or full"):
        TrainingConfig(method="lora", speed=SpeedConfig(fp8=True))
    with pytest.raises(ConfigError) as err:
        fp8.check_available(torch.device("cpu"))
    assert "FP8 tensor cores" in err.value.cause and "fp8: false" in err.value.fix


def test_gpt2_conv1d_layers_become_linear_for_fp8_and_save_as_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM

    gpt2 = MODEL.model_copy(update={"architecture": "gpt2", "num_kv_heads": 4})
    torch.manual_seed(0)
    model = build_model(gpt2, 300).eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    before = model(input_ids=ids).logits
    assert fp8.to_linear(model) == 4 * gpt2.num_layers  # c_attn, c_proj, c_fc, mlp c_proj per block
    assert isinstance(model.transformer.h[0].mlp.c_fc, torch.nn.Linear)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    with torch.no_grad():  # a training step changes the weights in the Linear layout
        model.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    trained = model(input_ids=ids).logits
    assert fp8.restore_layout(model) == 4 * gpt2.num_layers
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, trained)


def test_layers_and_attention_return_to_what_transformers_saves_after_fast_training():
    torch.manual_seed(0)
    model = build_model(MODEL, 300).eval()
    flash4.use_flash4(model)  # registration only: no kernel runs on the CPU
    assert model.config._attn_implementation == flash4.ATTENTION_NAME

    class Float8Like(torch.nn.Linear):  # stands for torchao's Float8Linear: an nn.Linear subclass
        pass

    up = model.model.layers[0].mlp.up_proj
    wrapped = Float8Like(up.in_features, up.out_features, bias=False)
    wrapped.weight = up.weight
    model.model.layers[0].mlp.up_proj = wrapped
    model._lmforge_fp8_names = ["model.layers.0.mlp.up_proj"]
    fp8.restore_layout(model)
    flash4.restore(model)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert model.model.layers[0].mlp.up_proj.weight is up.weight  # the trained weights, not a copy
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")  # whatever the model had before fa4 comes back
    flash4.use_flash4(model)
    flash4.restore(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("case", ["padding mask", "dropout", "sliding window", "float32"])
def test_flash_attention_4_refuses_attention_it_would_compute_wrongly(case):
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)  # transformers' [B, H, S, D]
    mask = torch.ones(1, 8, dtype=torch.bool) if case == "padding mask" else None
    kwargs = {"sliding_window": 4} if case == "sliding window" else {}
    args = (q.float(),) * 3 if case == "float32" else (q, q, q)
    with pytest.raises(ConfigError) as err:
        flash4.attention(torch.nn.Module(), *args, mask, dropout=0.1 if case == "dropout" else 0.0, **kwargs)
    assert "attention_backend: auto" in err.value.fix


def test_cuda_graph_settings_are_checked_for_every_phase_before_training():
    graphs = SpeedConfig(compile=True, compile_scope="model", cuda_graphs=True)
    gpu = PlacementConfig(num_workers=1, use_gpu=True)
    TrainingConfig(method="full", placement=gpu, speed=graphs)  # a valid combination
    accumulating = PhaseConfig(steps=5, learning_rate=1e-3, batch_size=4, seq_len=32, grad_accum=4)
    with pytest.raises(ValueError, match=re.escape("finetune.grad_accum is 4")):
        TrainingConfig(method="full", placement=gpu, finetune=accumulating, speed=graphs)
    with pytest.raises(ValueError, match="num_workers: 1"):
        TrainingConfig(method="full", placement=PlacementConfig(num_workers=2, use_gpu=True), speed=graphs)
    with pytest.raises(ValueError, match="use_gpu: true"):
        TrainingConfig(method="full", placement=PlacementConfig(num_workers=1, use_gpu=False), speed=graphs)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_bf16_residual_keeps_the_stream_in_bf16_and_computes_the_same_loss(architecture):
    # The loop autocasts on CUDA only; CPU autocast runs the same dtype rules, so the hooks are checked here.
    cfg = MODEL.model_copy(update={"architecture": architecture,
                                   "num_kv_heads": 4 if architecture == "gpt2" else 2})
    torch.manual_seed(0)
    model = build_model(cfg, 300)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids, labels=ids, output_hidden_states=True)
    hooked = 2 if architecture == "gpt2" else 1  # GPT-2 adds token and position embeddings
    assert speed.cast_residual(model, torch.bfloat16) == hooked
    assert speed.cast_residual(model, torch.bfloat16) == hooked  # asked twice, hooked once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert plain.hidden_states[1].dtype == torch.float32
    assert all(h.dtype == torch.bfloat16 for h in fast.hidden_states[:-1])  # every block's output
    # Only rounding of the stream differs: bf16 keeps ~3 significant digits.
    assert fast.loss.item() == pytest.approx(plain.loss.item(), rel=1e-3)
    fast.loss.backward()
    assert model.get_input_embeddings().weight.grad.dtype == torch.float32  # master weights stay float32
    speed.restore_residual(model)  # before a probe or save outside autocast
    assert model(input_ids=ids, output_hidden_states=True).hidden_states[1].dtype == torch.float32


def test_bf16_residual_is_refused_without_a_gpu():
    with pytest.raises(ValueError, match=r"use_gpu: true, or speed\.residual_dtype: float32"):
        TrainingConfig(method="pretrain", speed=SpeedConfig(residual_dtype="bfloat16"))
    training = TrainingConfig(method="pretrain", speed=SpeedConfig(residual_dtype="bfloat16"),
                              placement=PlacementConfig(use_gpu=True))
    with pytest.raises(ConfigError) as err:
        speed.apply_settings(build_model(MODEL, 300), training.speed, torch.device("cpu"))
    assert "CUDA only" in err.value.cause and "residual_dtype: float32" in err.value.fix


@pytest.mark.parametrize("dtype,smoothing", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.1)])
def test_cross_entropy_from_logits_matches_torch(dtype, smoothing):
    # The whole-model objective's loss keeps bf16 logits and a log-sum-exp; torch's keeps float32 log-probs.
    from lmforge.train.objective import IGNORE_INDEX, LogitsCrossEntropy

    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(40, 97, generator=g)).to(dtype)
    targets = torch.randint(0, 97, (40,), generator=g)
    targets[::7] = IGNORE_INDEX  # padding and prompt positions
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = LogitsCrossEntropy.apply(ours_in, targets, smoothing)
    ref = torch.nn.functional.cross_entropy(ref_in.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum",
                                            label_smoothing=smoothing)
    (2.5 * ours).backward()
    (2.5 * ref).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert ours_in.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)  # bf16 rounding
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)
    assert ours_in.grad[::7].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.slow  # inductor's C++ compilation of the model and the optimizer step on two cores
def test_compiled_optimizer_step_gives_the_eager_losses():
    eager = _losses()
    compiled = _losses(speed=SpeedConfig(compile=True, compile_scope="model", compile_optimizer=True))
    assert compiled == pytest.approx(eager, rel=1e-4)  # foreach AdamW fused by the compiler, same arithmetic


def test_compiled_optimizer_keeps_a_tensor_learning_rate_through_a_checkpoint():
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.loop import adamw

    with pytest.raises(ValueError, match="compile: true"):
        TrainingConfig(method="pretrain", speed=SpeedConfig(compile_optimizer=True))
    torch.manual_seed(0)
    model = build_model(MODEL, 300)
    optimizer = adamw(model, 1e-3, 0.01, torch.device("cpu"), compiled=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    model(input_ids=torch.randint(0, 300, (2, 8)), labels=torch.randint(0, 300, (2, 8))).loss.backward()
    optimizer.step()
    before = optimizer.param_groups[0]["lr"]
    schedule.step()  # fills the tensor in place: a compiled step sees the new rate without recompiling
    lr = optimizer.param_groups[0]["lr"]
    assert lr is before and isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(5e-4)
    tensors, meta = ckpt.optimizer_state(optimizer)
    assert meta["param_groups"][0]["lr"] == pytest.approx(5e-4)  # a number: the checkpoint's JSON holds it

    fresh = adamw(model, 1e-3, 0.01, torch.device("cpu"), compiled=True)
    torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 0.5 ** s)
    ckpt.load_optimizer(fresh, tensors, meta)
    restored = fresh.param_groups[0]["lr"]
    assert isinstance(restored, torch.Tensor) and restored.item() == pytest.approx(5e-4)
    first = next(iter(optimizer.state.values()))
    torch.testing.assert_close(next(iter(fresh.state.values()))["exp_avg"], first["exp_avg"])


def test_a_resumed_optimizer_steps_the_way_this_run_asks():
    # compile_optimizer may be switched between a run and its resume: the checkpoint's state loads,
    # but the kernel flags (fused / foreach / capturable) and the rate's type are this run's.
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.loop import adamw, rebase_schedule

    torch.manual_seed(0)
    model = build_model(MODEL, 300)
    model(input_ids=torch.randint(0, 300, (2, 8)), labels=torch.randint(0, 300, (2, 8))).loss.backward()
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    fused = torch.optim.AdamW(groups, lr=1e-3, fused=True)  # what a CUDA run without compile_optimizer writes
    torch.optim.lr_scheduler.LambdaLR(fused, lambda s: 1.0)
    fused.step()
    compiled = adamw(model, 1e-3, 0.01, torch.device("cpu"), compiled=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(compiled, lambda s: 1.0)
    ckpt.load_optimizer(compiled, *ckpt.optimizer_state(fused))
    group = compiled.param_groups[0]
    assert not group["fused"] and not group["capturable"] and isinstance(group["lr"], torch.Tensor)
    rebase_schedule(compiled, schedule, PhaseConfig(steps=4, learning_rate=2e-3, warmup_steps=2))
    assert compiled.param_groups[0]["lr"].item() == pytest.approx(1e-3)  # warm-up step 0 of 2 at peak 2e-3
    assert compiled.param_groups[0]["initial_lr"].item() == pytest.approx(2e-3)
    compiled.step()  # the one-tensor-at-a-time path on CPU runs with the loaded state

    back = adamw(model, 1e-3, 0.01, torch.device("cpu"))
    torch.optim.lr_scheduler.LambdaLR(back, lambda s: 1.0)
    ckpt.load_optimizer(back, *ckpt.optimizer_state(compiled))
    assert not isinstance(back.param_groups[0]["lr"], torch.Tensor) and not back.param_groups[0]["fused"]
    back.step()


@pytest.mark.slow  # inductor's C++ compilation on two cores (~30 s cold)
def test_a_compiled_optimizer_resumes_to_the_bit(tmp_path):
    from lmforge.train import checkpoint as ckpt

    ids = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(1))
    rows = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    training = TrainingConfig(method="pretrain", placement=PlacementConfig(use_ray=False),
                              logging=LoggingConfig(every=1), cpu_threads=1, checkpointing=CheckpointingConfig(every=3),
                              speed=SpeedConfig(compile=True, compile_scope="model", compile_optimizer=True))
    phase = PHASE.model_copy(update={"warmup_steps": 2})

    def run(folder, resume=None):
        torch.manual_seed(0)
        model = build_model(MODEL.model_copy(update={"dropout": 0.0}), 300)

        def save(step, tensors, loop_state):
            return ckpt.save(tmp_path / folder, f"pretrain-{step:07d}", tensors, {"loop": loop_state}, 5)
        skip = resume.state["loop"]["step"] if resume else 0
        history, _ = train_phase(model, "pretrain", phase, training, batch_stream(rows, 4, seed=0, skip=skip), [],
                                 torch.device("cpu"), save=save, resume=resume)
        return ckpt.trainable_state(model), {row["step"]: row["lr"] for row in history}

    import json

    from safetensors.torch import load_file

    whole, whole_rates = run("whole")  # checkpoints at steps 3 and 6; resume from the one at step 3
    path = tmp_path / "whole" / "pretrain-0000003"
    middle = ckpt.Checkpoint(path, {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")},
                             json.loads((path / "state.json").read_text()))
    resumed, resumed_rates = run("resumed", resume=middle)
    # The rates the optimizer ran at, to the bit (they once differed by a float32 rounding: tensor
    # base rates after a fresh start, floats after a resume). A freshly compiled kernel may still
    # round a weight differently (~1e-9 seen), so the weights get a float tolerance.
    assert [resumed_rates[s] for s in (4, 5, 6)] == [whole_rates[s] for s in (4, 5, 6)]
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-7)
