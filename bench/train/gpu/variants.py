"""The rows of ``bench.train.gpu`` as typed records, and the named groups a run picks them from.

A row (:class:`Variant`) is a workload shape, a loop and its step counts. The loop is either a
plain transformers/peft loop with some of the engine's optimizations switched on one by one
(:class:`PlainLoop`) or the engine's own loop (:class:`EngineRun`), whose GPU settings beyond its
defaults are an :class:`EngineSettings`, written as words joined by commas (``model,fa4,graphs``:
the notation of the row names in bench/results/train_gpu.jsonl, so a row's name can be pasted
into ``--gpt2``). Standard library only: this runs on bare GPU machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.core.errors import ConfigError

ABLATIONS = ("fused_adamw", "vocab64", "fused_loss", "compile_blocks")  # plain+X rows, one optimization each
SHAPES = ("gpt2", "llama")
# One word of an engine setting -> the TrainingConfig field it sets (group.field) and the value.
WORDS: dict[str, tuple[str, object]] = {
    "model": ("speed.compile_scope", "model"),  # the whole step in one graph (default: blocks compiled one by one)
    "blocks": ("speed.compile_scope", "blocks"),
    "cudnn": ("speed.attention_backend", "cudnn"),
    "fa4": ("speed.attention_backend", "fa4"),
    "liger": ("loss.kernel", "liger"),
    "graphs": ("speed.cuda_graphs", True),
    "fp8": ("speed.fp8", True),
    "bf16res": ("speed.residual_dtype", "bfloat16"),
    "opt": ("speed.compile_optimizer", True),
    "fsdp": ("parallel.strategy", "fsdp"),  # FSDP2 over a one-rank process group (the runner makes one)
    # DeepSpeed ZeRO (stage 3 unless stage2) over the same one-rank group; torch's AdamW, no compiled DeepSpeed op.
    "deepspeed": ("parallel.strategy", "deepspeed"),
    "stage2": ("parallel.deepspeed.stage", 2),
    "offload": ("parallel.deepspeed.offload_optimizer", True),  # AdamW's state and step on the host
}
PAGEABLE = "+pageable"


@dataclass(frozen=True)
class EngineSettings:
    """The engine's GPU settings beyond its defaults (blocks compiled, torch's fused loss, SDPA's
    choice of kernel). ``pageable``: host tensors go to the GPU from ordinary memory, as before the
    loop pinned them (the same-job comparison of pinned copies)."""

    words: tuple[str, ...] = ()
    pageable: bool = False

    @classmethod
    def parse(cls, text: str) -> EngineSettings:
        """``model,fa4,graphs`` (optionally ending in ``+pageable``) as settings; a word that is not
        in :data:`WORDS`, or two words for one field, is an error that names the fix."""
        if ";" in text:
            raise ConfigError(f"engine settings {text!r} hold ';'",
                              "give each setting as its own word: --gpt2 " + " ".join(p for p in text.split(";") if p))
        body, pageable = text.removesuffix(PAGEABLE), text.endswith(PAGEABLE)
        words = tuple(body.split(","))
        set_by: dict[str, str] = {}
        for word in words:
            if word not in WORDS:
                raise ConfigError(f"unknown engine setting {word!r} in {text!r}",
                                  f"join words from: {' '.join(WORDS)} with commas (e.g. model,fa4,graphs), "
                                  f"optionally ending in {PAGEABLE}")
            name = WORDS[word][0]
            if name in set_by:
                raise ConfigError(f"{text!r} sets {name} twice ({set_by[name]} and {word})", "keep one of the two")
            set_by[name] = word
        return cls(words, pageable)

    @property
    def name(self) -> str:
        return ",".join(self.words) + (PAGEABLE if self.pageable else "")

    def overrides(self) -> dict[str, object]:
        """The TrainingConfig fields these words set, as ``group.field``."""
        return dict(WORDS[word] for word in self.words)


@dataclass(frozen=True)
class PlainLoop:
    """A plain loop (float32 weights, bf16 autocast, AdamW, SDPA attention, the model's own loss,
    gradient clipping); each flag switches on one of the engine's optimizations (``lora``: over a
    peft model, ``compile_model``: ``torch.compile(model)``)."""

    lora: bool = False
    compile_model: bool = False
    fused_adamw: bool = False
    vocab64: bool = False
    fused_loss: bool = False
    compile_blocks: bool = False
    bf16_base: bool = False


@dataclass(frozen=True)
class EngineRun:
    """lmforge's own loop (``train_phase``) with its GPU settings: compiled blocks and the fused
    loss unless switched off, embeddings padded to ``vocab_multiple``, plus ``settings``."""

    method: str  # pretrain, full, lora or qlora
    settings: EngineSettings = field(default_factory=EngineSettings)
    compile: bool = True
    fused_loss: bool = True
    gradient_checkpointing: bool = False
    vocab_multiple: int = 64

    def training_fields(self) -> dict[str, dict[str, object]]:
        """The TrainingConfig groups this row sets: ``{"speed": {...}, "loss": {...}}``."""
        fields: dict[str, object] = {"speed.compile": self.compile, "loss.fused": self.fused_loss}
        if self.gradient_checkpointing:
            fields["speed.gradient_checkpointing"] = True
        groups: dict[str, dict[str, object]] = {}
        for key, value in {**fields, **self.settings.overrides()}.items():
            *path, name = key.split(".")  # group.field, or group.subgroup.field (parallel.deepspeed.stage)
            into: dict = groups
            for part in path:
                into = into.setdefault(part, {})
            into[name] = value
        return groups


@dataclass(frozen=True)
class Variant:
    """One row: its name in the results, the workload shape (``gpt2`` or ``llama``), the loop, and
    its warm-up (compilation happens there) and timed steps."""

    name: str
    shape: str
    loop: PlainLoop | EngineRun
    warmup: int
    steps: int


@dataclass(frozen=True)
class Steps:
    """Warm-up and timed steps per workload; the GPT-2 engine rows given by ``--gpt2`` warm up for
    ``gpt2_engine_warmup`` steps, also their log (and synchronization) cadence."""

    gpt2_warmup: int
    gpt2_steps: int
    gpt2_engine_warmup: int
    llama_warmup: int
    llama_steps: int


GPT2_SETTINGS = tuple(EngineSettings.parse(s) for s in (
    "model", "model,cudnn", "blocks,cudnn", "liger,cudnn", "model,liger,cudnn", "model,fa4", "blocks,fa4",
    "model,fa4,graphs", "model,cudnn,graphs", "model,fa4,graphs,fp8", "model,fa4,fp8", "model,fa4,graphs,bf16res",
    "model,cudnn,graphs,bf16res", "model,fa4,graphs,bf16res,opt", "model,cudnn,graphs,bf16res,opt"))
GPT2_BEST = (EngineSettings.parse("model,cudnn"), EngineSettings.parse("model,liger,cudnn"))


def groups(s: Steps) -> dict[str, list[Variant]]:
    """The named groups of ``--only``, in the order a run measures them. ``--gpt2`` rows and the
    ``--profile`` run come between ``llama_fp8`` and ``llama_full`` (see :func:`plan`)."""
    def gpt2(name: str, loop: PlainLoop | EngineRun, warmup: int = s.gpt2_warmup) -> Variant:
        return Variant(f"gpt2/{name}", "gpt2", loop, warmup, s.gpt2_steps)

    def llama(name: str, loop: PlainLoop | EngineRun) -> Variant:
        return Variant(name, "llama", loop, s.llama_warmup, s.llama_steps)

    def engine(method: str, words: str = "", **fields) -> EngineRun:
        return EngineRun(method, EngineSettings.parse(words) if words else EngineSettings(), **fields)

    plain, compiled = gpt2("plain", PlainLoop()), gpt2("plain+torch.compile", PlainLoop(compile_model=True))
    full_plain, peft = llama("llama_full/plain", PlainLoop()), llama("llama_lora/peft", PlainLoop(lora=True))
    return {
        "gpt2": [plain, compiled, gpt2("lmforge", engine("pretrain"))],
        "gpt2_compile": [compiled],  # the compile baseline alone (jobs that re-measure only the best settings)
        "gpt2_scopes": [gpt2(f"lmforge[{x.name}]", EngineRun("pretrain", x)) for x in GPT2_SETTINGS],
        "gpt2_best": [gpt2(f"lmforge[{x.name}]", EngineRun("pretrain", x)) for x in GPT2_BEST],
        "gpt2_baselines": [plain, compiled],  # the plain loop and plain + torch.compile, nothing of ours
        "llama_fa4": [full_plain, llama("llama_full/lmforge[fa4]", engine("full", "fa4")), peft,
                      llama("llama_lora/lmforge[fa4]", engine("lora", "fa4"))],
        "llama_fp8": [llama("llama_full/lmforge[fa4,fp8]", engine("full", "fa4,fp8"))],
        "llama_full": [full_plain, llama("llama_full/lmforge", engine("full"))],
        # Our loop as DDP runs it on one GPU (no wrapper), then sharded by FSDP2 over one rank: its overhead.
        "llama_fsdp": [llama("llama_full/lmforge", engine("full")), llama("llama_full/lmforge[fsdp]", engine("full", "fsdp"))],
        # ZeRO-3 (and 2, and 3 with the optimizer offloaded) against the same loop without DeepSpeed, uncompiled
        # both (strategy deepspeed refuses speed.compile: DeepSpeed's engine owns the step and its hooks).
        "llama_zero3": [llama("llama_full/lmforge-compile", engine("full", compile=False)),
                        llama("llama_full/lmforge-compile[deepspeed]", engine("full", "deepspeed", compile=False)),
                        llama("llama_full/lmforge-compile[deepspeed,offload]",
                              engine("full", "deepspeed,offload", compile=False))],
        "llama_zero2": [llama("llama_full/lmforge-compile", engine("full", compile=False)),
                        llama("llama_full/lmforge-compile[deepspeed,stage2]", engine("full", "deepspeed,stage2", compile=False))],
        "llama_full_model": [llama("llama_full/lmforge[model]", engine("full", "model"))],
        "llama_lora": [peft, llama("llama_lora/lmforge", engine("lora"))],
        "llama_lora_model": [llama("llama_lora/lmforge[model]", engine("lora", "model"))],
        # bitsandbytes NF4 base; blocks are not compiled (its 4-bit matmuls break graphs)
        "qlora": [llama("llama_qlora/lmforge", engine("qlora", compile=False))],
        "llama_cudnn": [llama("llama_full/lmforge[cudnn]", engine("full", "cudnn")),
                        llama("llama_lora/lmforge[cudnn]", engine("lora", "cudnn"))],
        # QLoRA as it is used for memory: with checkpointing; and with compiled blocks
        "qlora_more": [llama("llama_qlora/lmforge+checkpointing",
                             engine("qlora", compile=False, gradient_checkpointing=True)),
                       llama("llama_qlora/lmforge[blocks]", engine("qlora"))],
        "checkpointing": [llama("llama_full/lmforge+checkpointing", engine("full", gradient_checkpointing=True))],
        "ablations": [gpt2(f"plain+{flag}", PlainLoop(**{flag: True})) for flag in ABLATIONS]
        + [llama("llama_lora/peft+bf16_base", PlainLoop(lora=True, bf16_base=True)),
           llama("llama_full/plain+fused_loss", PlainLoop(fused_loss=True))],
        "compile_ablation": [gpt2("plain+compile_blocks", PlainLoop(compile_blocks=True))],
        # the engine with one of its optimizations switched off
        "engine_ablations": [gpt2("lmforge-fused_loss", engine("pretrain", fused_loss=False)),
                             gpt2("lmforge-vocab64", engine("pretrain", vocab_multiple=1))],
    }


BEFORE_GPT2 = ("gpt2", "gpt2_compile", "gpt2_scopes", "gpt2_best", "gpt2_baselines", "llama_fa4", "llama_fp8")
DEFAULT_ONLY = ("gpt2", "llama_full", "llama_lora", "ablations", "engine_ablations")


def gpt2_engine_row(settings: EngineSettings, s: Steps) -> Variant:
    """A ``--gpt2`` (or ``--profile``) row: the GPT-2 engine with these settings."""
    return Variant(f"gpt2/lmforge[{settings.name}]", "gpt2", EngineRun("pretrain", settings), s.gpt2_engine_warmup,
                   s.gpt2_steps)


def plan(only: list[str], gpt2: list[EngineSettings], s: Steps) -> tuple[list[Variant], list[Variant]]:
    """The rows to measure before and after the ``--profile`` run: the chosen groups (or single
    rows by name) in the order of :func:`groups`, the ``--gpt2`` rows after ``llama_fp8``. A row
    named twice runs once."""
    table = groups(s)
    by_name = {v.name: v for rows in table.values() for v in rows}
    for name in only:
        if name not in table and name not in by_name:
            hint = (f"give them as separate words: --only {' '.join(name.split(','))}" if "," in name else
                    f"choose groups from: {' '.join(table)}; or rows by name (--list shows them)")
            raise ConfigError(f"unknown group or row {name!r} for --only", hint)
    picked = [by_name[n] for n in only if n in by_name and n not in table]
    before = [v for g in BEFORE_GPT2 if g in only for v in table[g]] + [gpt2_engine_row(x, s) for x in gpt2]
    after = [v for g in table if g not in BEFORE_GPT2 and g in only for v in table[g]] + picked
    seen: set[str] = set()

    def once(rows: list[Variant]) -> list[Variant]:
        kept = []
        for v in rows:
            if v.name not in seen:
                seen.add(v.name)
                kept.append(v)
        return kept

    return once(before), once(after)
