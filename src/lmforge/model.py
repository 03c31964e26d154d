"""Build the decoder-only Transformer a run trains: tiny from config, or a pretrained base.

From config: Llama (RoPE, grouped-query attention, SwiGLU, RMSNorm) or GPT-2, with tied input and
output embeddings because at small sizes the embedding matrices are most of the parameters.
A pretrained base is loaded from safetensors only, and never with ``trust_remote_code``.
"""

from __future__ import annotations

import torch

from lmforge.config.stages import ModelConfig
from lmforge.errors import ConfigError


def build_model(cfg: ModelConfig, vocab_size: int):
    """A ``PreTrainedModel`` for causal LM whose embeddings cover ``vocab_size`` token ids."""
    if cfg.base_model:
        return _pretrained(cfg.base_model, vocab_size)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_config(cfg, vocab_size))


def model_config(cfg: ModelConfig, vocab_size: int):
    """The transformers config for a model built from ``cfg`` (random weights)."""
    if cfg.architecture == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_dropout=cfg.dropout,
            tie_word_embeddings=True,
            # Real ids are set from the tokenizer by the caller; the Llama defaults (1, 2) would
            # point at arbitrary BPE merges.
            bos_token_id=None,
            eos_token_id=None,
        )
    if cfg.architecture == "gpt2":
        from transformers import GPT2Config

        if cfg.num_kv_heads != cfg.num_heads:
            raise ConfigError(
                f"GPT-2 has no grouped-query attention, but num_kv_heads={cfg.num_kv_heads} "
                f"differs from num_heads={cfg.num_heads}",
                "set model.num_kv_heads equal to model.num_heads, or use architecture: llama")
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
        )
    raise ConfigError(f"unknown architecture {cfg.architecture!r}", "use `llama` or `gpt2`")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights counted once), optionally only those being trained."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _pretrained(name: str, vocab_size: int):
    from transformers import AutoModelForCausalLM

    try:
        # float32 master weights: autocast provides bf16 on CUDA; CPU training wants fp32.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=False,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load base_model {name!r}: {exc}",
                          "set model.base_model to a local directory with config.json and "
                          "model.safetensors (or a hub name when online)") from None
    rows = model.get_input_embeddings().num_embeddings
    # Embeddings padded past the tokenizer (common, for speed) are fine; a tokenizer with ids the
    # embeddings do not cover would index out of range mid-training.
    if vocab_size > rows:
        raise ConfigError(
            f"tokenizer has {vocab_size} tokens but base_model {name!r} has embeddings for {rows}",
            "use the base model's own tokenizer: delete the workspace's tokenizer directory and "
            "rerun tokenizer training with model.base_model set")
    return model
