"""The ``model`` section: the decoder-only Transformer's architecture, or the pretrained base to start from.

Read by the tokenize stage (``vocab_size``, ``chat_template``), the train stage (every field) and ``lmforge model info``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section

# The templates of lmforge.model.prompt.TEMPLATES (a unit test keeps the two lists equal).
ChatTemplateName = Literal["lmforge", "chatml", "llama3"]
# Architecture bounds a few times past the largest published models (Llama 3 405B: 126 layers,
# width 16,384, feed-forward 53,248, 128 heads; vocabularies up to 256k): a typo such as
# hidden_size: 2**20 fails here instead of asking for terabytes later.
MAX_WIDTH = 65_536
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_VOCAB = 1 << 21
MAX_CONTEXT = 1 << 21


class ModelConfig(Section):
    """A decoder-only Transformer built from config, or a pretrained base."""

    architecture: str = Field(
        "llama",
        description="transformers causal-LM model type: llama (RoPE, GQA, SwiGLU, RMSNorm), gpt2, or any "
        "other model type transformers knows (mistral, qwen2, gpt_neox, ...), built with the dimensions below.",
    )
    base_model: str | None = Field(
        None, description="Start from these weights instead of random ones: a local model directory, a hub name, "
        "or a registered model, models:/NAME@champion (the current champion; any alias works) or models:/NAME/VERSION, "
        "which also brings its tokenizer and chat template (the version used is recorded on the training run).",
    )
    vocab_size: int = Field(2048, ge=256, le=MAX_VOCAB, description="Size of the byte-level BPE tokenizer to train.")
    chat_template: ChatTemplateName = Field(
        "lmforge", description="Chat format of a model built from config (or of a base_model whose tokenizer has "
        "none; a base's own template is always kept): lmforge (### Instruction / ### Response), chatml "
        "(<|im_start|>role ... <|im_end|>) or llama3 (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>). "
        "Its special tokens join the trained tokenizer; the template is saved with the model and used by serving.",
    )
    hidden_size: int = Field(128, gt=0, le=MAX_WIDTH)
    num_layers: int = Field(2, gt=0, le=MAX_LAYERS)
    num_heads: int = Field(4, gt=0, le=MAX_HEADS)
    num_kv_heads: int = Field(2, gt=0, le=MAX_HEADS, description="Grouped-query attention: key/value heads.")
    intermediate_size: int = Field(384, gt=0, le=4 * MAX_WIDTH)
    max_seq_len: int = Field(256, ge=16, le=MAX_CONTEXT, description="Context window in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = Field(
        True, description="Share the input embedding and output layer weights (most of a small model's parameters)."
    )
    vocab_multiple: int = Field(
        1, ge=1, le=4096, description="Round the embedding rows up to a multiple of this (64 speeds up GPU matrix "
        "products); the extra rows are never a target, so training pushes their logits down.",
    )

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self
