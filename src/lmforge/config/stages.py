"""One frozen pydantic model per pipeline stage, composed into :class:`PipelineConfig`.

Every model forbids unknown keys, so a typo in a YAML file is an error instead of a silent
default. Field descriptions are the help text shown by ``lmforge config schema`` and rendered as
form hints in the Prefect UI, where these same models are the flow's parameters.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- data


class StdlibSource(StageConfig):
    """Docstrings of the Python standard library installed on this machine: no network needed."""

    type: Literal["stdlib"] = "stdlib"
    max_bytes: int = Field(1_000_000, gt=0, description="Stop collecting after this many bytes of text.")
    modules: list[str] = Field(
        default_factory=list,
        description="Top-level stdlib modules to read; empty means every importable pure-Python module.",
    )


class LocalSource(StageConfig):
    """Text files on disk (.txt, .md, .jsonl with a text field)."""

    type: Literal["local"] = "local"
    paths: list[str] = Field(..., min_length=1, description="Files or directories to read.")
    include: list[str] = Field(default_factory=lambda: ["*.txt", "*.md", "*.jsonl"])
    text_field: str = Field("text", description="Field holding the text in .jsonl records.")


SourceConfig = Annotated[Union[StdlibSource, LocalSource], Field(discriminator="type")]


class InstructionConfig(StageConfig):
    """The supervised fine-tuning set derived from stdlib docstrings."""

    max_records: int = Field(2000, gt=0, description="Most instruction/response pairs to derive.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share held out for evaluation (by hash).")
    source: Literal["stdlib", "none"] = Field(
        "stdlib",
        description="Where the pairs come from: `stdlib` derives them from the installed standard "
        "library's docstrings whatever the document sources are; `none` writes no SFT set.",
    )


class DataConfig(StageConfig):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [StdlibSource()],
        min_length=1,
        description="Where documents come from; each entry is chosen by its `type`.",
    )
    instructions: InstructionConfig = Field(default_factory=InstructionConfig)


# ---------------------------------------------------------------- curation


class CurationConfig(StageConfig):
    normalize: Literal["NFC", "NFKC", "none"] = Field("NFKC", description="Unicode normalization form.")
    exact_dedup: bool = Field(True, description="Drop documents whose normalized text was seen before.")
    min_chars: int = Field(40, ge=0, description="Drop documents shorter than this.")
    max_chars: int = Field(20_000, gt=0, description="Drop documents longer than this.")
    heldout_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Share of documents (chosen by hash) held out for perplexity."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "CurationConfig":
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


# ---------------------------------------------------------------- validation


class ValidationConfig(StageConfig):
    enabled: bool = Field(True, description="Run the Great Expectations gate before training.")
    min_documents: int = Field(50, ge=1, description="Fail when the curated corpus has fewer documents.")
    min_chars: int = Field(1, ge=0, description="Every document must be at least this long.")
    max_chars: int = Field(50_000, gt=0, description="Every document must be at most this long.")
    max_duplicate_fraction: float = Field(0.0, ge=0, le=1, description="Allowed share of duplicate texts.")
    allowed_sources: list[str] = Field(
        default_factory=list,
        description="Source types a document may come from (e.g. [stdlib, local]); empty skips the check.",
    )


# ---------------------------------------------------------------- model


class ModelConfig(StageConfig):
    """A decoder-only Transformer built from config, or a pretrained base."""

    architecture: Literal["llama", "gpt2"] = Field("llama", description="transformers model family.")
    base_model: str | None = Field(
        None, description="A local model directory or hub name to start from instead of random weights."
    )
    vocab_size: int = Field(2048, ge=256, description="Size of the byte-level BPE tokenizer to train.")
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0, description="Grouped-query attention: key/value heads.")
    intermediate_size: int = Field(384, gt=0)
    max_seq_len: int = Field(256, ge=16, description="Context window in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


# ---------------------------------------------------------------- training


class PhaseConfig(StageConfig):
    """One optimization phase (pretraining or fine-tuning)."""

    steps: int = Field(..., ge=0, description="Optimizer steps; 0 skips the phase.")
    learning_rate: float = Field(..., gt=0)
    batch_size: int = Field(8, gt=0, description="Sequences per worker per micro-batch.")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


class LoraConfig(StageConfig):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainingConfig(StageConfig):
    pretrain: PhaseConfig = Field(
        # About four passes over the ~300k-token default corpus with two workers: a couple of
        # minutes on two CPU cores, enough for the demo model to learn real structure.
        default_factory=lambda: PhaseConfig(steps=500, learning_rate=3e-3, batch_size=8, seq_len=128,
                                            warmup_steps=20)
    )
    finetune: PhaseConfig = Field(
        # Instruction records are short; 64 tokens hold prompt and answer without padding waste.
        default_factory=lambda: PhaseConfig(steps=200, learning_rate=3e-3, batch_size=8, seq_len=64,
                                            warmup_steps=10)
    )
    finetune_method: Literal["lora", "full", "none"] = Field(
        "lora", description="How the instruction phase trains the model; `none` skips it."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description="Logical CPUs each worker reserves in Ray.")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    use_ray: bool = Field(True, description="Launch through Ray Train; false runs one process in-line.")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, gt=0, description="Steps between logged metrics.")
    val_batches: int = Field(8, gt=0, description="Held-out batches per worker for each phase's validation loss.")
    cpu_threads: int = Field(
        0, ge=0, description="torch threads per worker when training on CPU; 0 shares the node's cores among its workers."
    )


# ---------------------------------------------------------------- evaluation, registry, serving


class EvaluationConfig(StageConfig):
    max_batches: int = Field(20, gt=0, description="Held-out batches for perplexity.")
    max_examples: int = Field(40, gt=0, description="Held-out instructions for exact match and ROUGE-L.")
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass (perplexity blocks and prompts).")
    block_size: int = Field(
        128, ge=8, description="Tokens per held-out perplexity block; capped at the model's context window."
    )


class RegistryConfig(StageConfig):
    model_name: str = Field("lmforge-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str = Field("lmforge", min_length=1)
    alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]*$")
    metric: str = Field("eval_perplexity", description="Metric that decides promotion.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    min_improvement: float = Field(
        0.01, ge=0, description="Relative margin the candidate must beat the champion by (0.01 = 1%)."
    )


class ServingConfig(StageConfig):
    host: str = Field("127.0.0.1", description="Bind address; loopback by default.")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    max_new_tokens: int = Field(64, gt=0, description="Default and cap for a request's max_tokens.")
    max_batch_size: int = Field(8, gt=0, description="Requests decoded together.")
    startup_timeout_s: float = Field(120, gt=0)
    probe_prompt: str = Field("What does `json.dumps` do?", description="Request the deploy stage sends.")


class PlatformConfig(StageConfig):
    """Where each part runs. Empty values mean the embedded default inside LMFORGE_HOME."""

    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server URI; default sqlite in the workspace (env MLFLOW_TRACKING_URI wins)."
    )
    ray_address: str | None = Field(None, description="Existing Ray cluster; default a local Ray (env RAY_ADDRESS).")
    schedule_cron: str = Field("0 3 * * 0", description="Retraining schedule of the `lmforge ui` deployment.")


class PipelineConfig(StageConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    platform: PlatformConfig = Field(default_factory=PlatformConfig)
