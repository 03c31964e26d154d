"""What a configured model costs: parameters, FLOPs per token, and training memory at the configured batch.

``lmforge model info CONFIG`` prints it; the train stage calls :func:`fit_warning` before a run and
warns when the estimate exceeds the device's memory. The model is built on PyTorch's meta device
(shapes, no storage), so this is instant even for billions of parameters.

FLOPs per token (Kaplan et al.; PaLM appendix B): training ``6·N + 12·L·h·S``, forward only
``2·N + 4·L·h·S``, with N all parameters (tied ones once), L layers, h the hidden size and S the
sequence length. MFU = training FLOPs per token x tokens/s / peak (989 TFLOP/s for a dense bf16 H100).

Memory (bytes, one worker): float32 master weights (4 per parameter; a frozen base 2 in bf16 on GPUs,
about 0.55 in QLoRA's 4 bits), gradients (4 per trainable parameter), AdamW moments (8 per trainable
parameter), and activations per token per layer ``2·(6h + 2·kv + 4·I) + 8h`` (bf16 tensors saved for
the backward pass, float32 residual stream; flash attention keeps no S x S matrix) plus the output
layer's logits (10 bytes per vocabulary entry per token, or one 512 MiB chunk with the fused loss).
Gradient checkpointing keeps 4h per token per layer plus one layer's activations. It is an estimate:
``bench/train_gpu.py`` records it next to measured peaks.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.model.build import count_parameters, model_config
from lmforge.model.memory import PhaseMemory, Shape, phase_memory
from lmforge.model.parallel_memory import (
    DEFAULT_GPU,
    TENSOR_DEGREES,
    Layout,
    StrategyMemory,
    advice,
    per_worker,
    strategy_table,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (datasheet), the MFU denominator
GIB = 1024 ** 3


def estimate_parameters(model_cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Parameters of a model built from ``model_cfg`` in closed form (no model built; the pre-flight check).

    Exact for llama (q, k, v, o; gate, up, down; two norms per layer) and gpt2 (biases, two layer
    norms, learned positions); other model types are counted as llama is, which is close.
    """
    shape = Shape.from_config(model_cfg, vocab_size)
    h, kv = shape.hidden, shape.hidden * shape.kv_heads // shape.heads
    embeddings = shape.vocab * h * (1 if model_cfg.tie_embeddings else 2)
    if model_cfg.architecture == "gpt2":
        per_layer = (h * 3 * h + 3 * h) + (h * h + h) + 2 * (h * shape.intermediate) + shape.intermediate + h + 4 * h
        return embeddings + model_cfg.max_seq_len * h + shape.layers * per_layer + 2 * h
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * shape.intermediate + 2 * h
    return embeddings + shape.layers * per_layer + h


class MemoryEstimateWarning(UserWarning):
    """The training memory estimate exceeds the memory of the device the run would use."""


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    layers: int
    hidden: int
    vocab: int
    params_total: int
    params_trainable_finetune: int
    train_flops_per_token: dict[str, float]
    forward_flops_per_token: dict[str, float]
    memory: list[PhaseMemory]
    device: str
    device_bytes: int
    strategies: list[StrategyMemory]  # per worker, by phase: ddp, fsdp, fsdp with tensor_parallel
    configured: list[StrategyMemory]  # per worker, by phase, under the config's own training.parallel
    advice: list[str]  # by phase: the strategy a GPU of the visible (or an 80 GB) size needs

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("memory", "strategies", "configured"):
            for row, item in zip(out[key], getattr(self, key)):
                row["total"] = item.total
        return out


def train_flops_per_token(params: int, layers: int, hidden: int, seq_len: int) -> float:
    """6·N + 12·L·h·S: forward and backward FLOPs per trained token."""
    return 6.0 * params + 12.0 * layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak: float = H100_BF16_PEAK) -> float:
    return tokens_per_s * flops_per_token / peak


def describe(model_cfg: ModelConfig, training: TrainingConfig, vocab_size: int | None = None) -> ModelInfo:
    """Sizes, FLOPs and memory of ``model_cfg`` trained as ``training`` says."""
    model = _meta_model(model_cfg, vocab_size or model_cfg.vocab_size)
    config = model.config
    total = count_parameters(model)
    trainable = _trainable_after_method(model, training) if training.method != "pretrain" else total
    layers, hidden = config.num_hidden_layers, config.hidden_size
    phases = [("pretrain", training.pretrain, "pretrain")]
    if training.method != "pretrain":
        phases.append(("finetune", training.finetune, training.method))
    phases = [p for p in phases if p[1].steps > 0] or phases[:1]
    device, budget = device_budget(training.placement.use_gpu)
    memory = [phase_memory(name, phase, method, Shape.of(config), total,
                           total if method in ("pretrain", "full") else trainable, training,
                           on_gpu=training.placement.use_gpu) for name, phase, method in phases]
    return ModelInfo(
        architecture=config.model_type, layers=layers, hidden=hidden, vocab=config.vocab_size, params_total=total,
        params_trainable_finetune=trainable,
        train_flops_per_token={n: train_flops_per_token(total, layers, hidden, p.seq_len) for n, p, _ in phases},
        forward_flops_per_token={n: 2.0 * total + 4.0 * layers * hidden * p.seq_len for n, p, _ in phases},
        memory=memory, device=device, device_bytes=budget,
        **_strategies(model, training, phases, total, trainable, (device, budget)))


def _strategies(model: PreTrainedModel, training: TrainingConfig, phases: list, total: int, trainable: int,
                device: tuple[str, int]) -> dict:
    """``strategies`` and ``advice`` of :class:`ModelInfo` (:mod:`lmforge.model.parallel_memory`)."""
    config, shape, parallel = model.config, Shape.of(model.config), training.parallel
    # Parameters under a numbered module (layers.3., h.3.) are the blocks', which tensor parallelism splits.
    blocks = sum(p.numel() for name, p in model.named_parameters() if re.search(r"\.\d+\.", name))
    degrees = tuple(t for t in TENSOR_DEGREES if parallel.model_copy(update={"tensor_parallel": t}).model_problem(
        config.model_type, shape.heads, shape.kv_heads) is None)
    tp = parallel.tensor_parallel if parallel.tensor_parallel > 1 else (degrees[0] if degrees else 1)
    gpu = device if training.placement.use_gpu and device[1] else DEFAULT_GPU
    rows, sentences, configured = [], [], []
    for name, phase, method in phases:
        own = total if method in ("pretrain", "full") else trainable
        layout = Layout(shape, blocks / total, training.speed.gradient_checkpointing, training.loss.fused,
                        training.placement.use_gpu)
        mem = phase_memory(name, phase, method, shape, total, own, training, on_gpu=training.placement.use_gpu)
        rows += strategy_table(mem, layout, training.placement.num_workers, tp, parallel.sequence_parallel)
        configured.append(per_worker(mem, layout, parallel.strategy, training.placement.num_workers,
                                     parallel.tensor_parallel, parallel.sequence_parallel, parallel.pipeline_parallel))
        on_gpu = phase_memory(name, phase, method, shape, total, own, training, on_gpu=True)  # the advice is for GPUs
        sentences.append(advice(on_gpu, Layout(shape, blocks / total, layout.checkpointing, layout.fused_loss, True),
                                gpu, degrees))
    return {"strategies": rows, "advice": sentences, "configured": configured}


def fit_warning(model_cfg: ModelConfig, training: TrainingConfig, vocab_size: int | None = None) -> str | None:
    """A message when a phase's estimated memory per worker (under the configured ``training.parallel``)
    exceeds the device's, else None."""
    info = describe(model_cfg, training, vocab_size)
    for phase in info.configured:
        if info.device_bytes and phase.total > info.device_bytes:
            return (f"the {phase.phase} phase needs about {phase.total / GIB:.1f} GiB per worker ({phase.label}) "
                    f"(weights {phase.weights / GIB:.1f}, gradients {phase.gradients / GIB:.1f}, optimizer "
                    f"{phase.optimizer / GIB:.1f}, activations {phase.activations / GIB:.1f}) but the {info.device} "
                    f"has {info.device_bytes / GIB:.1f} GiB: lower the batch_size (raise grad_accum to keep the "
                    f"batch), set training.speed.gradient_checkpointing: true, use an adapter method, or share the "
                    f"model over more workers (training.parallel: `lmforge model info` says which fits)")
    return None


def info_lines(info: ModelInfo) -> list[str]:
    """The human-readable report of ``lmforge model info``."""
    lines = [f"{info.architecture}: {info.layers} layers, hidden {info.hidden}, vocabulary {info.vocab}",
             f"parameters: {info.params_total:,} (trainable when fine-tuning: {info.params_trainable_finetune:,})"]
    for name, flops in info.train_flops_per_token.items():
        lines.append(f"{name}: {flops / 1e9:.3f} GFLOP per trained token (6N + 12·L·h·S), "
                     f"{info.forward_flops_per_token[name] / 1e9:.3f} GFLOP per token forward")
    for m in info.memory:
        lines.append(f"{m.phase} ({m.method}, {m.batch_tokens} tokens per micro-batch): weights {_size(m.weights)}, "
                     f"gradients {_size(m.gradients)}, optimizer {_size(m.optimizer)}, activations "
                     f"{_size(m.activations)}, total {_size(m.total)}")
    lines.append(f"device: {info.device}, {_size(info.device_bytes)}")
    for s in info.strategies:
        lines.append(f"{s.phase} per worker, {s.label}: weights {_size(s.weights)}, gradients {_size(s.gradients)}, "
                     f"optimizer {_size(s.optimizer)}, activations {_size(s.activations)}, total {_size(s.total)}")
    lines += info.advice
    return lines


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _meta_model(model_cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM  # seconds to import; `lmforge info` needs it here only

    if model_cfg.base_model:
        try:
            config = AutoConfig.from_pretrained(model_cfg.base_model, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the config of base_model {model_cfg.base_model!r}: {exc}",
                              "set model.base_model to a local model directory (or a hub name when online)") from None
    else:
        config = model_config(model_cfg, vocab_size)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _trainable_after_method(model: PreTrainedModel, training: TrainingConfig) -> int:
    from lmforge.train.methods.catalog import apply_method  # imports peft, which costs seconds

    # QLoRA trains exactly LoRA's parameters; counting needs no 4-bit reload.
    counted = training.model_copy(update={"method": "lora"}) if training.method == "qlora" else training
    with torch.device("meta"):
        adapted = apply_method(model, counted)
    return count_parameters(adapted, trainable_only=True)


def device_budget(use_gpu: bool) -> tuple[str, int]:
    """(name, bytes) of the memory one worker here trains in: GPU 0's, or the host's; 0 when unknown."""
    if use_gpu:
        if not torch.cuda.is_available():
            return "GPU (none visible here: no fit check)", 0
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        warnings.warn("cannot read the host's memory size; no fit check", MemoryEstimateWarning, stacklevel=2)
        return "host (CPU) memory", 0
    limit = _cgroup_memory_limit()
    if limit and limit < physical:  # a container sees the host's RAM but is killed at its own limit
        return "container memory limit", limit
    return "host (CPU) memory", physical


def _cgroup_memory_limit() -> int | None:
    """The cgroup v2 memory limit of this process, in bytes (None when unlimited or unknown)."""
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
