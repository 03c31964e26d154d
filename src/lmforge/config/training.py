"""Configs of the model and train stages: architecture, phases, the fine-tuning method and its knobs.

Re-exported by :mod:`lmforge.config.stages` (the pipeline composes them there). Like every stage
config these are frozen and forbid unknown keys; ``training.method`` chooses how the fine-tuning
phase trains, and the method's own section (``lora``, ``adapter``, ``prompt_learning``, ``ia3``)
holds its settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("pretrain", "full", "lora", "qlora", "adapter", "prefix", "ptuning_v2", "prompt", "ptuning", "ia3")
Method = Literal["pretrain", "full", "lora", "qlora", "adapter", "prefix", "ptuning_v2", "prompt", "ptuning", "ia3"]
# The old key `finetune_method` still loads: lora and full mean the same, none is pretraining only.
_LEGACY_METHODS = {"lora": "lora", "full": "full", "none": "pretrain"}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Frozen):
    """A decoder-only Transformer built from config, or a pretrained base."""

    architecture: str = Field(
        "llama",
        description="transformers causal-LM model type: llama (RoPE, GQA, SwiGLU, RMSNorm), gpt2, or any "
        "other model type transformers knows (mistral, qwen2, gpt_neox, ...), built with the dimensions below.",
    )
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
    tie_embeddings: bool = Field(
        True, description="Share the input embedding and output layer weights (most of a small model's parameters)."
    )
    vocab_multiple: int = Field(
        1, ge=1, description="Round the embedding rows up to a multiple of this (64 speeds up GPU matrix "
        "products); the extra rows are never a target, so training pushes their logits down.",
    )

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


class PhaseConfig(_Frozen):
    """One optimization phase (pretraining or fine-tuning)."""

    steps: int = Field(..., ge=0, description="Optimizer steps; 0 skips the phase.")
    learning_rate: float = Field(..., gt=0)
    batch_size: int = Field(8, gt=0, description="Sequences per worker per micro-batch.")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"


class LoraConfig(_Frozen):
    """LoRA and QLoRA: low-rank updates of the chosen linear layers."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers to adapt, by name; [all-linear] adapts every linear layer but the output head.",
    )


class AdapterConfig(_Frozen):
    """Bottleneck adapters (Houlsby et al. 2019) or, as a variant, LLaMA-Adapter (through peft)."""

    variant: Literal["houlsby", "llama_adapter"] = Field(
        "houlsby", description="houlsby: bottleneck MLPs after each attention and feed-forward block; "
        "llama_adapter: gated adaption prompts in the top layers' attention (llama, mistral, gpt2).",
    )
    bottleneck: int = Field(16, gt=0, description="Houlsby: hidden width of each adapter.")
    target_modules: list[str] = Field(
        default_factory=list, description="Houlsby: output projections to follow with an adapter, by name "
        "suffix; empty means the architecture's attention and feed-forward output projections.",
    )
    train_norms: bool = Field(True, description="Houlsby: also train the layer norms, as the paper does.")
    adapter_len: int = Field(10, gt=0, description="llama_adapter: adaption prompt length.")
    adapter_layers: int = Field(2, gt=0, description="llama_adapter: number of top layers that get prompts.")


class PromptLearningConfig(_Frozen):
    """Virtual-token methods: prefix, ptuning_v2, prompt, ptuning."""

    num_virtual_tokens: int = Field(16, gt=0)
    encoder_hidden_size: int = Field(
        128, gt=0, description="prefix: width of the reparameterization MLP; ptuning: of the prompt encoder."
    )
    encoder: Literal["MLP", "LSTM"] = Field("MLP", description="ptuning: prompt encoder type.")


class IA3Config(_Frozen):
    """(IA)^3: learned rescaling of keys, values and feed-forward activations."""

    target_modules: list[str] = Field(
        default_factory=list, description="Modules whose outputs (or, for feed-forward ones, inputs) are "
        "rescaled; empty means peft's defaults for the architecture.",
    )
    feedforward_modules: list[str] = Field(
        default_factory=list, description="Which of target_modules are feed-forward; empty means peft's defaults."
    )


class TrainingConfig(_Frozen):
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
    method: Method = Field(
        "lora",
        description="How the fine-tuning phase trains: full, lora, qlora, adapter, prefix, ptuning_v2, prompt, "
        "ptuning, ia3; `pretrain` runs the pretraining phase only.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    prompt_learning: PromptLearningConfig = Field(default_factory=PromptLearningConfig)
    ia3: IA3Config = Field(default_factory=IA3Config)
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description="Logical CPUs each worker reserves in Ray.")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend, bf16 autocast.")
    use_ray: bool = Field(True, description="Launch through Ray Train; false runs one process in-line.")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs); compile_scope says how much.")
    compile_scope: Literal["blocks", "model"] = Field(
        "blocks", description="blocks: each Transformer block alone (one graph for all, short compile, works with "
        "every method); model: the whole forward with its loss in one graph (embeddings, head and loss fused too; "
        "uses the plain loss, so the logits are held).",
    )
    cuda_graphs: bool = Field(
        False, description="With compile_scope: model on CUDA, replay each step's forward and backward as CUDA "
        "graphs (torch.compile's reduce-overhead mode): no per-kernel launch cost left on the host. Needs "
        "grad_accum 1 and fixed batch shapes (packed data).",
    )
    compile_optimizer: bool = Field(
        False, description="torch.compile the gradient clipping and the optimizer step too (foreach AdamW fused by "
        "the compiler; under cuda_graphs replayed as a CUDA graph with the step). Needs compile: true.",
    )
    fp8: bool = Field(
        False, description="FP8 matrix products in the linear layers (torchao float8 training, dynamic per-tensor "
        "scales; the output layer stays bf16). Methods pretrain and full, on Ada/Hopper or newer GPUs. Pays "
        "on wide layers (Llama 1.1B: +13% on an H100), not on narrow ones (GPT-2 124M: -12%).",
    )
    residual_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="The residual stream's dtype on GPUs (embeddings and the sum every block adds to). "
        "float32 keeps it at the weights' precision; bfloat16 halves its memory traffic, as Megatron-LM does "
        "by default (products already run in bf16 under autocast). Pays where elementwise work is a large "
        "share of a step (small models). Needs use_gpu.",
    )
    fused_loss: bool = Field(
        True, description="Chunked output-layer + cross-entropy that never holds all logits at once."
    )
    loss_kernel: Literal["torch", "liger"] = Field(
        "torch", description="The fused loss's implementation: torch (chunks in plain torch, anywhere) or liger "
        "(Liger kernels' Triton fused linear cross-entropy; CUDA with liger-kernel installed).",
    )
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "fa4"] = Field(
        "auto", description="SDPA kernel tried first on CUDA: auto is cudnn on Hopper (measured fastest there) and "
        "torch's own order elsewhere; the others stay as fallbacks. fa4: FlashAttention-4's kernels instead of "
        "SDPA (Hopper/Blackwell, flash-attn-4 installed, no attention dropout or padding mask).",
    )
    seed: int = 0
    log_every: int = Field(10, gt=0, description="Steps between logged metrics (and NaN checks).")
    val_batches: int = Field(8, gt=0, description="Held-out batches per worker for each validation loss.")
    eval_every: int = Field(0, ge=0, description="Steps between validation losses; 0: only at the end of a phase.")
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop a phase after this many validations without a better loss (and keep the "
        "best weights); 0 never stops early. Needs eval_every.",
    )
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints; 0 writes none.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per run (older ones are deleted).")
    cpu_threads: int = Field(
        0, ge=0, description="torch threads per worker when training on CPU; 0 shares the node's cores among its workers."
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and "finetune_method" in data:
            data = dict(data)
            legacy = data.pop("finetune_method")
            if "method" in data:
                raise ValueError("give training.method only (finetune_method is its old name)")
            if legacy not in _LEGACY_METHODS:
                raise ValueError(f"finetune_method must be one of {sorted(_LEGACY_METHODS)}, got {legacy!r}")
            data["method"] = _LEGACY_METHODS[legacy]
        return data

    @model_validator(mode="after")
    def _early_stopping(self) -> "TrainingConfig":
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every > 0 (validations to compare)")
        if self.cuda_graphs:
            self._check_cuda_graphs()
        if self.compile_optimizer and not self.compile:
            raise ValueError("compile_optimizer compiles the optimizer step with the model: set compile: true, or "
                             "compile_optimizer: false")
        if self.residual_dtype == "bfloat16" and not self.use_gpu:
            raise ValueError("residual_dtype: bfloat16 needs bf16 autocast, which runs on GPUs only: set use_gpu: "
                             "true, or residual_dtype: float32")
        if self.fp8 and self.method not in ("pretrain", "full"):
            raise ValueError(f"fp8 trains all weights in FP8 matrix products; method {self.method!r} freezes them: "
                             "use fp8 with method pretrain or full, or set fp8: false")
        return self

    def _check_cuda_graphs(self) -> None:
        # All here, before any step: a phase that cannot replay its steps must not fail after another ran.
        if not (self.compile and self.compile_scope == "model"):
            raise ValueError("cuda_graphs replays the whole compiled step: set compile: true and compile_scope: model "
                             "(or cuda_graphs: false)")
        if not self.use_gpu:
            raise ValueError("cuda_graphs needs use_gpu: true (CUDA graphs exist on GPUs only), or cuda_graphs: false")
        if self.use_ray and self.num_workers > 1:
            raise ValueError(f"cuda_graphs runs one process (DDP's all-reduce runs outside the graphs), but "
                             f"num_workers is {self.num_workers}: set num_workers: 1, or cuda_graphs: false")
        phases = [("pretrain", self.pretrain)] + ([("finetune", self.finetune)] if self.method != "pretrain" else [])
        for name, phase in phases:
            if phase.steps and phase.grad_accum > 1:
                raise ValueError(f"cuda_graphs replays one micro-batch per step, but {name}.grad_accum is "
                                 f"{phase.grad_accum}: set it to 1 (raise batch_size instead), or cuda_graphs: false")

    @property
    def finetune_method(self) -> str:
        """The old name of ``method``: ``none`` when there is no fine-tuning phase."""
        return "none" if self.method == "pretrain" else self.method

    @property
    def finetunes(self) -> bool:
        """Whether a fine-tuning phase runs."""
        return self.method != "pretrain" and self.finetune.steps > 0
