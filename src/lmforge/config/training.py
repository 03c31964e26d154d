"""The ``training`` section: phases, the fine-tuning method, and one small group per concern.

``training.method`` chooses how the fine-tuning phase trains, and the method's own group (``lora``,
``adapter``, ``prompt_learning``, ``ia3``) holds its settings. The rest is grouped by the part of
the engine that reads it, one small documented class per group (as torchtitan's job config is):
``preference`` turns the fine-tuning phase into preference tuning (DPO or ORPO on the preference set, ``training.method``
still naming what trains; ``method: dpo`` / ``method: orpo`` are short for LoRA with that loss). ``placement`` (Ray workers
and GPUs: :mod:`lmforge.train.launch`), ``parallel`` (replicas or shards: :mod:`lmforge.config.parallel`), ``optimizer`` and
``loss`` (the loop and its objective), ``speed`` (switches that make a step faster without changing what it learns;
:mod:`lmforge.train.accel.speed` receives only this group), and the loop's periodic work, each with its ``every``:
``validation``, ``checkpointing``, ``logging``. A rule that spans groups lives on :class:`TrainingConfig`; the flat keys of
older files are in ``TrainingConfig.moved_keys``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section
from lmforge.config.parallel import ParallelConfig
from lmforge.core.runtime import torchrun_world

METHODS = ("pretrain", "full", "lora", "qlora", "adapter", "prefix", "ptuning_v2", "prompt", "ptuning", "ia3")
Method = Literal["pretrain", "full", "lora", "qlora", "adapter", "prefix", "ptuning_v2", "prompt", "ptuning", "ia3"]
# `method: dpo` (or orpo) is short for `method: lora` with `preference.loss: dpo`: LoRA is the default trainable part.
PREFERENCE_LOSSES = ("dpo", "orpo")
# The old key `finetune_method` still loads: lora and full mean the same, none is pretraining only.
_LEGACY_METHODS = {"lora": "lora", "full": "full", "none": "pretrain"}
# Bounds far beyond any real run, which stop a typo (or 1e20) before it allocates or loops for ever:
# Llama 3 405B trained for about 1.2M steps; 64k sequences per worker per micro-batch fill any device.
MAX_STEPS = 100_000_000
MAX_BATCH = 65_536
MAX_SEQ_LEN = 1 << 21


class PhaseConfig(Section):
    """One optimization phase (pretraining or fine-tuning)."""

    steps: int = Field(..., ge=0, le=MAX_STEPS, description="Optimizer steps; 0 skips the phase.")
    # Loose on purpose: a learning rate far too high is how a divergence is provoked (and tested).
    learning_rate: float = Field(..., gt=0, le=1e6, description="Peak learning rate, reached at the end of the "
                                 "warm-up.")
    batch_size: int = Field(8, gt=0, le=MAX_BATCH, description="Sequences per worker per micro-batch.")
    seq_len: int = Field(128, ge=8, le=MAX_SEQ_LEN, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS, description="Steps of linear warm-up to learning_rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="After the warm-up: cosine or linear decay to a tenth of learning_rate, or constant."
    )


class LoraConfig(Section):
    """LoRA and QLoRA: low-rank updates of the chosen linear layers."""

    r: int = Field(16, gt=0, le=65_536, description="LoRA rank.")
    alpha: int = Field(32, gt=0, le=1 << 20, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers to adapt, by name; [all-linear] adapts every linear layer but the output head.",
    )


class AdapterConfig(Section):
    """Bottleneck adapters (Houlsby et al. 2019) or, as a variant, LLaMA-Adapter (through peft)."""

    variant: Literal["houlsby", "llama_adapter"] = Field(
        "houlsby", description="houlsby: bottleneck MLPs after each attention and feed-forward block; "
        "llama_adapter: gated adaption prompts in the top layers' attention (llama, mistral, gpt2).",
    )
    bottleneck: int = Field(16, gt=0, le=65_536, description="Houlsby: hidden width of each adapter.")
    target_modules: list[str] = Field(
        default_factory=list, description="Houlsby: output projections to follow with an adapter, by name "
        "suffix; empty means the architecture's attention and feed-forward output projections.",
    )
    train_norms: bool = Field(True, description="Houlsby: also train the layer norms, as the paper does.")
    adapter_len: int = Field(10, gt=0, le=65_536, description="llama_adapter: adaption prompt length.")
    adapter_layers: int = Field(2, gt=0, le=4096, description="llama_adapter: number of top layers that get prompts.")


class PromptLearningConfig(Section):
    """Virtual-token methods: prefix, ptuning_v2, prompt, ptuning."""

    num_virtual_tokens: int = Field(16, gt=0, le=65_536, description="Virtual tokens learned in front of every sequence.")
    encoder_hidden_size: int = Field(
        128, gt=0, le=65_536, description="prefix: width of the reparameterization MLP; ptuning: of the prompt encoder."
    )
    encoder: Literal["MLP", "LSTM"] = Field("MLP", description="ptuning: prompt encoder type.")


class IA3Config(Section):
    """(IA)^3: learned rescaling of keys, values and feed-forward activations."""

    target_modules: list[str] = Field(
        default_factory=list, description="Modules whose outputs (or, for feed-forward ones, inputs) are "
        "rescaled; empty means peft's defaults for the architecture.",
    )
    feedforward_modules: list[str] = Field(
        default_factory=list, description="Which of target_modules are feed-forward; empty means peft's defaults."
    )


class PreferenceTuningConfig(Section):
    """Preference tuning: the fine-tuning phase learns from (prompt, chosen, rejected) records.

    ``training.method`` stays what trains (lora by default, any method but pretrain); this group
    picks the loss. DPO's reference is the model at the start of the phase (the frozen base; the
    adapter disabled), its log-probabilities computed once before the first step. ORPO needs none.
    """

    loss: Literal["dpo", "orpo"] | None = Field(
        None, description="dpo: Direct Preference Optimization against the frozen base as reference; orpo: "
        "Odds Ratio Preference Optimization, reference-free (the chosen answer's NLL plus an odds-ratio term), "
        "for a base without a separate SFT phase; null: plain SFT on the instruction set.",
    )
    beta: float = Field(
        0.1, gt=0, le=1000, description="dpo: scale of the implicit reward (the strength of the pull toward the reference); "
        "orpo: weight of the odds-ratio term beside the NLL (the paper's lambda). Rewards are logged on this scale.",
    )


class PlacementConfig(Section):
    """Where the workers run: Ray Train's DDP ranks (or one process in-line), their CPUs and GPUs."""

    # A cap for the one-host and small-cluster runs lmforge launches; beyond it a typo is likelier.
    num_workers: int = Field(2, ge=1, le=1024, description="Ray Train workers (DDP ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, le=1024, description="Logical CPUs each worker reserves in Ray.")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend, bf16 autocast.")
    use_ray: bool = Field(True, description="Launch through Ray Train; false runs one process in-line.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each worker reserves besides its CPUs and GPU, e.g. "
        "{node2: 1} to place the workers on nodes started with `ray start --resources='{\"node2\": 1}'`.",
    )

    @model_validator(mode="after")
    def _custom_resources_only(self) -> PlacementConfig:
        # CPU and GPU have their own keys; the same amount under two keys would be ambiguous.
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU") or amount <= 0:
                raise ValueError(f"resources.{name}: {amount} is not a custom resource amount; CPUs and GPUs are set by "
                                 "cpus_per_worker and use_gpu, custom amounts are above 0")
        return self


class OptimizerConfig(Section):
    """AdamW's settings beside the phase's learning rate and schedule."""

    weight_decay: float = Field(
        0.01, ge=0, le=10, description="AdamW weight decay of the weight matrices (biases and norms get none)."
    )
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Largest global gradient norm; larger gradients are scaled down.")


class LossConfig(Section):
    """The training objective: next-token cross-entropy, and how it is computed."""

    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Share of each target's probability spread over the vocabulary; 0 is plain "
        "cross-entropy.",
    )
    fused: bool = Field(
        True, description="Chunked output-layer + cross-entropy that never holds all logits at once."
    )
    kernel: Literal["torch", "liger"] = Field(
        "torch", description="The fused loss's implementation: torch (chunks in plain torch, anywhere) or liger "
        "(Liger kernels' Triton fused linear cross-entropy; CUDA with liger-kernel installed).",
    )


class SpeedConfig(Section):
    """Switches that make a step faster or lighter without changing what the model learns."""

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
        "grad_accum 1, one worker and fixed batch shapes (packed data).",
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
        "share of a step (small models). Needs placement.use_gpu.",
    )
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "fa4"] = Field(
        "auto", description="SDPA kernel tried first on CUDA: auto is cudnn on Hopper (measured fastest there) and "
        "torch's own order elsewhere; the others stay as fallbacks. fa4: FlashAttention-4's kernels instead of "
        "SDPA (Hopper/Blackwell, flash-attn-4 installed, no attention dropout or padding mask).",
    )

    @model_validator(mode="after")
    def _compiled_optimizer(self) -> SpeedConfig:
        if self.compile_optimizer and not self.compile:
            raise ValueError("compile_optimizer compiles the optimizer step with the model: set compile: true, or "
                             "compile_optimizer: false")
        return self


class TrainValidationConfig(Section):
    """The validation loss on held-out batches during a phase, and early stopping on it."""

    every: int = Field(0, ge=0, le=MAX_STEPS, description="Steps between validation losses; 0: only at the end of a phase.")
    batches: int = Field(8, gt=0, le=MAX_BATCH, description="Held-out batches per worker for each validation loss.")
    early_stopping_patience: int = Field(
        0, ge=0, le=MAX_STEPS, description="Stop a phase after this many validations without a better loss (and keep the "
        "best weights); 0 never stops early. Needs every.",
    )

    @model_validator(mode="after")
    def _early_stopping(self) -> TrainValidationConfig:
        if self.early_stopping_patience and not self.every:
            raise ValueError("early_stopping_patience needs every > 0 (validations to compare)")
        return self


class CheckpointingConfig(Section):
    """Checkpoints a run resumes from: after a worker dies (Ray Train restarts it) or by
    ``lmforge train --resume [RUN_ID]``. On by default, by time (``every_minutes``)."""

    every: int = Field(0, ge=0, le=MAX_STEPS, description="Steps between checkpoints; 0: by time only (every_minutes).")
    # Ten minutes bounds the work a dead worker costs, while writing a checkpoint (seconds even
    # for large models) stays a small share of the run; tiny runs end long before, writing none.
    every_minutes: float = Field(
        10.0, ge=0, le=7 * 24 * 60, description="Minutes of training between checkpoints (checked at logged steps, "
        "logging.every); 0: by steps only. With every and every_minutes both 0, no checkpoint is written.",
    )
    keep: int = Field(2, ge=1, le=1000, description="Checkpoints kept per run (older ones are deleted).")
    max_failures: int = Field(
        2, ge=0, le=1000, description="Worker failures (a killed process, a lost node) Ray Train recovers from by "
        "restarting the workers from the latest checkpoint before the run fails; 0 fails at the first. Under Ray only.",
    )

    @property
    def enabled(self) -> bool:
        """True when the loop writes checkpoints (by steps, by time or both)."""
        return bool(self.every or self.every_minutes)


class LoggingConfig(Section):
    """The metrics the loop logs (history, progress lines, the tracker)."""

    every: int = Field(10, gt=0, le=MAX_STEPS, description="Steps between logged metrics (and NaN checks).")


class TrainingConfig(Section):
    """The train stage's section: what to train (phases, method) and how (one group per concern)."""

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
        "ptuning, ia3; `pretrain` runs the pretraining phase only. `dpo` and `orpo` are short for lora with "
        "preference.loss dpo or orpo (preference tuning on the preference set).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    prompt_learning: PromptLearningConfig = Field(default_factory=PromptLearningConfig)
    ia3: IA3Config = Field(default_factory=IA3Config)
    preference: PreferenceTuningConfig = Field(default_factory=PreferenceTuningConfig)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the weights' initialization, the data order and dropout.")
    cpu_threads: int = Field(
        0, ge=0, le=4096,
        description="torch threads per worker when training on CPU; 0 shares the node's cores among its workers.",
    )
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    validation: TrainValidationConfig = Field(default_factory=TrainValidationConfig)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    # The flat keys of files written before the groups, and where each lives now.
    moved_keys: ClassVar[Mapping[str, str]] = {
        **{key: f"placement.{key}" for key in ("num_workers", "cpus_per_worker", "use_gpu", "use_ray")},
        **{key: f"optimizer.{key}" for key in ("weight_decay", "grad_clip")},
        "label_smoothing": "loss.label_smoothing", "fused_loss": "loss.fused", "loss_kernel": "loss.kernel",
        **{key: f"speed.{key}" for key in ("gradient_checkpointing", "compile", "compile_scope", "cuda_graphs",
                                          "compile_optimizer", "fp8", "residual_dtype", "attention_backend")},
        "eval_every": "validation.every", "val_batches": "validation.batches",
        "early_stopping_patience": "validation.early_stopping_patience",
        "checkpoint_every": "checkpointing.every", "keep_checkpoints": "checkpointing.keep",
        "log_every": "logging.every",
    }

    @model_validator(mode="before")
    @classmethod
    def _legacy_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and "finetune_method" in data:
            data = dict(data)
            legacy = data.pop("finetune_method")
            if "method" in data:
                raise ValueError("give training.method only (finetune_method is its old name)")
            if not isinstance(legacy, str) or legacy not in _LEGACY_METHODS:
                raise ValueError(f"finetune_method must be one of {sorted(_LEGACY_METHODS)}, got {legacy!r}")
            data["method"] = _LEGACY_METHODS[legacy]
        if isinstance(data, dict) and data.get("method") in PREFERENCE_LOSSES:
            data, loss = dict(data), data["method"]
            if not isinstance(data.get("preference") or {}, dict):
                return data  # the preference group's own validation names what is wrong with it
            preference = dict(data.get("preference") or {})
            if preference.get("loss") not in (None, loss):
                raise ValueError(f"method: {loss} asks for {loss}, but preference.loss is {preference['loss']!r}: give "
                                 "one (method: lora with preference.loss picks another trainable part)")
            data["method"], data["preference"] = "lora", {**preference, "loss": loss}
        return data

    @model_validator(mode="after")
    def _across_groups(self) -> TrainingConfig:
        speed = self.speed
        if speed.cuda_graphs:
            self._check_cuda_graphs()
        if speed.residual_dtype == "bfloat16" and not self.placement.use_gpu:
            raise ValueError("speed.residual_dtype: bfloat16 needs bf16 autocast, which runs on GPUs only: set "
                             "placement.use_gpu: true, or speed.residual_dtype: float32")
        if self.preference_tuning:
            self._check_preference()
        self.parallel.check(self.method, self.placement.use_ray, speed.model_dump(), self.placement.num_workers)
        for name, phase in (("pretrain", self.pretrain), ("finetune", self.finetune)):
            self.parallel.check_pipeline_rows(name, phase.batch_size * phase.grad_accum)
        if speed.fp8 and self.method not in ("pretrain", "full"):
            raise ValueError(f"speed.fp8 trains all weights in FP8 matrix products; method {self.method!r} freezes "
                             "them: use fp8 with method pretrain or full, or set speed.fp8: false")
        return self

    def _check_preference(self) -> None:
        loss = self.preference.loss
        if self.method == "pretrain":
            raise ValueError(f"preference.loss: {loss} tunes the fine-tuning phase, and method pretrain has none: set "
                             "method to what trains (lora, full, qlora, adapter, ...), or method: dpo")
        if self.speed.compile and self.speed.compile_scope == "model":
            raise ValueError(f"preference.loss: {loss} computes per-sequence log-probabilities outside a whole-model "
                             "graph: set speed.compile_scope: blocks (or speed.compile: false)")
        if self.loss.label_smoothing or self.loss.kernel != "torch":
            raise ValueError(f"preference.loss: {loss} has its own loss: loss.label_smoothing and loss.kernel are for "
                             "next-token cross-entropy; leave them at 0 and torch")

    def _check_cuda_graphs(self) -> None:
        # All here, before any step: a phase that cannot replay its steps must not fail after another ran.
        speed, placement = self.speed, self.placement
        if not (speed.compile and speed.compile_scope == "model"):
            raise ValueError("speed.cuda_graphs replays the whole compiled step: set speed.compile: true and "
                             "speed.compile_scope: model (or speed.cuda_graphs: false)")
        if not placement.use_gpu:
            raise ValueError("speed.cuda_graphs needs placement.use_gpu: true (CUDA graphs exist on GPUs only), or "
                             "speed.cuda_graphs: false")
        if (workers := torchrun_world() or (placement.num_workers if placement.use_ray else 1)) > 1:
            raise ValueError(f"speed.cuda_graphs runs one process (DDP's all-reduce runs outside the graphs), but "
                             f"the run has {workers} workers: set placement.num_workers: 1 (one torchrun process), or "
                             "speed.cuda_graphs: false")
        phases = [("pretrain", self.pretrain)] + ([("finetune", self.finetune)] if self.method != "pretrain" else [])
        for name, phase in phases:
            if phase.steps and phase.grad_accum > 1:
                raise ValueError(f"speed.cuda_graphs replays one micro-batch per step, but {name}.grad_accum is "
                                 f"{phase.grad_accum}: set it to 1 (raise batch_size instead), or speed.cuda_graphs: "
                                 "false")

    @property
    def finetune_method(self) -> str:
        """The old name of ``method``: ``none`` when there is no fine-tuning phase."""
        return "none" if self.method == "pretrain" else self.method

    @property
    def preference_tuning(self) -> bool:
        """Whether the fine-tuning phase learns from preference pairs (``preference.loss``)."""
        return self.preference.loss is not None

    @property
    def finetunes(self) -> bool:
        """Whether a fine-tuning phase runs."""
        return self.method != "pretrain" and self.finetune.steps > 0
