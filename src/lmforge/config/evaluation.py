"""The ``evaluation`` section: how much held-out data the evaluate stage scores, and how."""

from __future__ import annotations

from pydantic import Field

from lmforge.config.base import Section


class EvaluationConfig(Section):
    """The evaluate stage's section: perplexity on held-out blocks, exact match and ROUGE-L on instructions."""

    max_batches: int = Field(20, gt=0, description="Held-out batches for perplexity.")
    max_examples: int = Field(40, gt=0, description="Held-out instructions for exact match and ROUGE-L.")
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated per held-out instruction.")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass (perplexity blocks and prompts).")
    block_size: int = Field(
        128, ge=8, description="Tokens per held-out perplexity block; capped at the model's context window."
    )
