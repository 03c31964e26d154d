"""One replica's training memory, by part: the arithmetic behind ``lmforge model info`` and the pre-flight check.

The formula is :mod:`lmforge.model.info`'s docstring; :mod:`lmforge.model.parallel_memory` divides
its parts among the workers of each strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.config.model import ModelConfig
from lmforge.config.training import PhaseConfig, TrainingConfig
from lmforge.model.build import padded_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


@dataclass(frozen=True)
class Shape:
    """The dimensions the arithmetic below reads, from a transformers config or from a ModelConfig alone."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: PreTrainedConfig) -> Shape:
        heads = config.num_attention_heads
        inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, intermediate=inter,
                   vocab=config.vocab_size)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int | None = None) -> Shape:
        """A model built from ``model_cfg`` (no base_model), without importing transformers."""
        return cls(layers=model_cfg.num_layers, hidden=model_cfg.hidden_size, heads=model_cfg.num_heads,
                   kv_heads=model_cfg.num_kv_heads, intermediate=model_cfg.intermediate_size,
                   vocab=padded_vocab(model_cfg, vocab_size or model_cfg.vocab_size))


@dataclass(frozen=True)
class PhaseMemory:
    phase: str
    method: str
    batch_tokens: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def phase_memory(name: str, phase: PhaseConfig, method: str, shape: Shape, total: int,
                 trainable: int, training: TrainingConfig, on_gpu: bool) -> PhaseMemory:
    """One worker's training memory for ``phase`` (the module docstring gives the formula)."""
    tokens = phase.batch_size * phase.seq_len
    frozen = total - trainable
    frozen_bytes = {"qlora": 0.55}.get(method, 2.0 if on_gpu and method in ("lora", "ia3", "adapter") else 4.0)
    act = layer_activations(shape, tokens, training.speed.gradient_checkpointing)
    return PhaseMemory(phase=name, method=method, batch_tokens=tokens, weights=int(4 * trainable + frozen_bytes * frozen),
                       gradients=4 * trainable, optimizer=8 * trainable,
                       activations=int(act + logit_bytes(shape, tokens, training.loss.fused)))


def layer_activations(shape: Shape, tokens: int, checkpointing: bool, tensor_parallel: int = 1,
                      sequence_parallel: bool = False) -> float:
    """Bytes the blocks keep for the backward pass of ``tokens`` tokens (the module docstring's formula).

    Under tensor parallelism each worker keeps its heads' and MLP columns' share of the per-head and
    intermediate tensors (3h of the 6h, the key/values, the 4 intermediate ones); the norms' and residual
    tensors are whole on every worker unless ``sequence_parallel`` splits them along the sequence."""
    hidden, inter = shape.hidden, shape.intermediate
    kv = hidden * shape.kv_heads // shape.heads
    split = 2 * (3 * hidden + 2 * kv + 4 * inter) / tensor_parallel
    whole = (2 * 3 * hidden + 8 * hidden) / (tensor_parallel if sequence_parallel else 1)
    if checkpointing:  # each block's input (4h per token), and one block's activations while it is recomputed
        return tokens * (shape.layers * 4 * hidden / (tensor_parallel if sequence_parallel else 1) + split + whole)
    return tokens * shape.layers * (split + whole)


def logit_bytes(shape: Shape, tokens: int, fused: bool) -> int:
    """The output layer's logits (and their gradient): one 512 MiB chunk at most with the fused loss."""
    vocab = shape.vocab
    return min(tokens, (1 << 29) // (4 * vocab)) * vocab * 8 if fused else tokens * vocab * 10
