"""Build the decoder-only Transformer a run trains: from config by architecture name, or a pretrained base.

From config: Llama (RoPE, grouped-query attention, SwiGLU, RMSNorm), GPT-2, or any other causal-LM
model type transformers knows, given the same dimensions; input and output embeddings are tied by
default because at small sizes the embedding matrices are most of the parameters. A pretrained base is
loaded from safetensors only, and never with ``trust_remote_code``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, cast

import torch

from lmforge.config.model import ModelConfig
from lmforge.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

# Attribute names of the dropout probabilities across transformers' configs.
_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout")


def build_model(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """A ``PreTrainedModel`` for causal LM whose embeddings cover ``vocab_size`` token ids."""
    if cfg.base_model:
        return _pretrained(cfg.base_model, vocab_size)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_config(cfg, vocab_size))


def padded_vocab(cfg: ModelConfig, vocab_size: int) -> int:
    """Embedding rows for a tokenizer of ``vocab_size``: rounded up to ``cfg.vocab_multiple``."""
    return -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


def model_config(cfg: ModelConfig, vocab_size: int) -> PreTrainedConfig:
    """The transformers config for a model built from ``cfg`` (random weights)."""
    rows = padded_vocab(cfg, vocab_size)
    if cfg.architecture == "gpt2":
        from transformers import GPT2Config

        _no_gqa(cfg, "GPT-2")
        return GPT2Config(vocab_size=rows, n_positions=cfg.max_seq_len, n_embd=cfg.hidden_size,
                          n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                          resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                          tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None)
    if cfg.architecture == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=rows, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           num_key_value_heads=cfg.num_kv_heads, hidden_act="silu",
                           max_position_embeddings=cfg.max_seq_len, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
                           # Real ids are set from the tokenizer by the caller; the Llama defaults
                           # (1, 2) would point at arbitrary BPE merges.
                           bos_token_id=None, eos_token_id=None)
    return _generic_config(cfg, rows)


def _generic_config(cfg: ModelConfig, rows: int) -> PreTrainedConfig:
    """Any other causal-LM model type, through the dimension names transformers standardizes."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = sorted(a for a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if a[:3] == cfg.architecture[:3])
        raise ConfigError(f"unknown architecture {cfg.architecture!r}: transformers has no causal LM of that type",
                          f"use llama, gpt2 or another transformers model type{f' (close: {close})' if close else ''}")
    config_class = type(AutoConfig.for_model(cfg.architecture))
    accepted = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    if "num_key_value_heads" not in accepted:
        _no_gqa(cfg, cfg.architecture)
    dims: dict[str, int | float | None] = {
        "vocab_size": rows, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if "num_key_value_heads" in accepted:
        dims["num_key_value_heads"] = cfg.num_kv_heads
    if "head_dim" in accepted:  # some families default it to their largest model's value
        dims["head_dim"] = cfg.hidden_size // cfg.num_heads
    dims.update({key: cfg.dropout for key in _DROPOUT_KEYS if key in accepted})
    config = AutoConfig.for_model(cfg.architecture, **dims)
    got = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
           "num_attention_heads": config.num_attention_heads}
    wanted = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads}
    if got != wanted:
        raise ConfigError(f"architecture {cfg.architecture!r} did not take the configured dimensions ({got} != {wanted})",
                          "use llama or gpt2, or start from a pretrained model.base_model of that family")
    return config


def _no_gqa(cfg: ModelConfig, family: str) -> None:
    if cfg.num_kv_heads != cfg.num_heads:
        raise ConfigError(
            f"{family} has no grouped-query attention, but num_kv_heads={cfg.num_kv_heads} "
            f"differs from num_heads={cfg.num_heads}",
            "set model.num_kv_heads equal to model.num_heads, or use architecture: llama")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights counted once), optionally only those being trained."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 empties a parameter; ds_numel: its size
    return total


def _pretrained(name: str, vocab_size: int) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        # float32 master weights: autocast provides bf16 on CUDA; CPU training wants fp32.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=False,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load base_model {name!r}: {exc}",
                          "set model.base_model to a local directory with config.json and "
                          "model.safetensors (or a hub name when online)") from None
    check_vocab(model, vocab_size, repr(name))
    return model


def check_vocab(model: PreTrainedModel, vocab_size: int, what: str) -> None:
    """Refuse a tokenizer with ids the model's embeddings do not cover.

    Embeddings padded past the tokenizer (common, for speed) are fine; uncovered ids would index
    out of range in the middle of training.
    """
    # Typed nn.Module by transformers; a causal LM's input embedding is an nn.Embedding (or a subclass).
    rows = cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings
    if vocab_size > rows:
        raise ConfigError(
            f"tokenizer has {vocab_size} tokens but base_model {what} has embeddings for {rows}",
            "use the base model's own tokenizer: delete the workspace's tokenizer directory and "
            "rerun tokenizer training with model.base_model set")
