"""The ``evaluation`` section: which held-out text the evaluate stage scores, how much of it, and which
lm-evaluation-harness tasks it runs."""

from __future__ import annotations

from pydantic import Field, field_validator

from lmforge.config.base import Section


class EvaluationConfig(Section):
    """The evaluate stage's section: perplexity and bits per byte on held-out text, exact match and
    ROUGE-L on instructions, and lm-evaluation-harness tasks."""

    max_batches: int = Field(
        20, gt=0, le=1_000_000,
        description="Held-out text budget when a set is frozen: max_batches x batch_size x block_size tokens."
    )
    max_examples: int = Field(40, gt=0, le=1_000_000, description="Held-out instructions for exact match and ROUGE-L.")
    max_new_tokens: int = Field(32, gt=0, le=65_536, description="Tokens generated per held-out instruction.")
    batch_size: int = Field(8, gt=0, le=65_536, description="Sequences per forward pass (perplexity windows, prompts, tasks).")
    block_size: int = Field(
        128, ge=8, le=1 << 21, description="Tokens per held-out scoring window; capped at the model's context window."
    )
    frozen_set: str = Field(
        "auto",
        min_length=1,
        description=(
            "Held-out text every candidate of registry.model_name is scored on. 'auto': the set frozen when the "
            "name was first evaluated (kept in the workspace, published on the registered model), frozen now from "
            "the workspace data if none exists; 'off': the workspace's current held-out data, nothing frozen; "
            "or a path to a frozen set directory (heldout.jsonl, sft_test.jsonl, optional tokenizer/)."
        ),
    )
    tasks: list[str] = Field(
        default_factory=list,
        description=(
            "lm-evaluation-harness task YAML files or directories of them, run offline on the trained model; "
            "relative dataset paths inside a task resolve from the working directory."
        ),
    )
    task_limit: int | None = Field(
        None, gt=0, description="At most this many documents per lm-evaluation-harness task (all when unset)."
    )

    @field_validator("tasks")
    @classmethod
    def _no_empty_task_paths(cls, value: list[str]) -> list[str]:
        if any(not path.strip() for path in value):
            raise ValueError("evaluation.tasks holds an empty path; list task YAML files or directories")
        return value
