"""Device check of the serving engine's adapter and quantization paths against references.

    PYTHONPATH=src python bench/serve_gpu_check.py [--device cuda|cpu] [--out DIR]

The CPU tests never run the paths the engine takes on CUDA (Triton kernels, decode steps replayed
from captured CUDA graphs, the int8 Triton matmul, the fp8 KV cache on Hopper). This script builds a
tiny Llama on the fly (byte-level BPE of ~1000 entries from ``lmforge.tokenizer.build_bpe``, hidden
256, 4 layers, 4 query / 2 KV heads), pretrains it briefly so its greedy choices are confident (a
random model's near-ties would make token comparisons meaningless), trains a few optimizer steps of
each adapter, and checks on ``--device``:

1. ``multi_lora``: base + 2 LoRA adapters served unmerged in one mixed batch (15 requests on 8
   rows, chunked prefill) against each adapter merged into the base and served alone ("greedy"),
   and against the merged model's forward over the engine's own tokens ("forced");
2. ``prompt_<method>`` for prefix, ptuning_v2, prompt, ptuning: the engine against peft's own model
   (``load_trained``) in the serving dtype, decoding greedily by its full forward, and forced;
3. ``int8_multi_lora`` (int8 weights with the two adapters) against the unquantized engine, and
   ``fp8_kv_prefix`` (fp8 KV cache with the prefix adapter; CPU, or CUDA capability >= 8.9) against
   the same engine on PyTorch ops, and against the unquantized engine (quality, sanity bound only);
4. ``graphs_vs_eager_*``: the requests of 1 and of the prefix adapter with ``cuda_graphs=False``.

Every request is greedy with 24 new tokens. Requests are queued together before the engine may admit
any, so a run's schedule (which rows decode together) is the same every time. The engine's logits
of every step are read from its backend's prefill and decode outputs. Two engines decoding freely
diverge after a near-tie flip (their histories then differ), so "greedy" comparisons check logits
up to and including the first differing token; "forced" ones check every step. Tolerances and why:
``TOLERANCES``. One JSON line per check goes to stdout and to ``OUT/serve_gpu_check.jsonl``
(``--only a,b`` runs some checks). Exit status 1 when a check fails. Needs torch, transformers,
peft, tokenizers, safetensors, pydantic (no pytest, ray or mlflow). Meant to stay under 90 s on an
H100 (not yet timed there); 2-5 minutes on 2 shared CPU cores, where every comparison is float32.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine import Engine, SamplingParams

NEW = 24
VIRTUAL = 20  # with 16-token blocks: one block shared by every sequence, 4 tokens copied into each
METHODS = ("prefix", "ptuning_v2", "prompt", "ptuning")
# Distinct first tokens: a prefill chunk that starts at 0 names its prompt (Recorder.prefill).
PROMPTS = [
    "def encode(self, o):",
    "class JSONEncoder(object):",
    "x",
    "    Return a JSON string representation of a Python data structure. If skipkeys is true then dict "
    "keys that are not basic types will be skipped instead of raising a TypeError, and the items",
    "import re",
]
CFG = ServingConfig(max_batch_size=8, max_prefill_tokens=32, kv_block_size=16, kv_cache_mb=64,
                    max_new_tokens=64, max_queue=64)
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)

# Why these numbers: float32 runs differ only in summation order (merged vs unmerged LoRA, peft's
# dense attention vs the paged one): ~1e-6 relative, so tokens must agree and logits within 1e-4.
# bf16 rounds every activation to 8 mantissa bits (~0.4% per op); through 4 layers two computation
# orders differ by ~0.5-1.5% of the logits' L2 norm, growing a little along the sequence: 3% at the
# first step, 5% at any later step. A real bug (wrong adapter, position, cache row or prefix) moves
# the logits by tens of percent: each adapter's own effect is recorded and must exceed 3x the
# first-step tolerance, or the check could not tell. Two kinds of comparison:
# - "forced": the reference model's forward over the prompt plus the ENGINE's tokens (teacher
#   forcing): logits at every step, and how often the reference's argmax is the engine's token.
#   Only near-ties flip under bf16 noise (a few % of steps on this tiny model): agreement >= 0.9.
# - "greedy" (engine vs engine, or vs the merged adapter served alone): both decode freely; after
#   the first differing token their histories differ, so logits are compared up to and including
#   that step, and the share of matching leading tokens has a low floor under bf16 (0.5: one
#   near-tie flip early in a 24-token sequence loses most of its tokens; a CPU fp8-cache run with 1%
#   logits error kept 0.65); the logits at the flip carry the check.
# Quantized engines: int8 weights vs the unquantized engine move the logits ~1.5% at the first step
# and up to ~8% later (CPU, float32). The fp8 KV cache is compared with the same engine on PyTorch
# ops (the CPU path) with the same fp8 cache, which isolates the Triton fp8 kernels; against the
# unquantized engine it moves the logits ~9% (measured on CPU: the prefix's keys are large, and e4m3
# keeps 3 mantissa bits), which is recorded as "vs_unquantized" with a sanity bound only.
TOLERANCES = {
    "float32": {"first": 1e-4, "any": 1e-3, "agreement": 0.99, "forced_agreement": 0.99},
    "bfloat16": {"first": 0.03, "any": 0.05, "agreement": 0.5, "forced_agreement": 0.9},
    "int8": {"first": 0.06, "any": 0.15, "agreement": 0.5},
    "fp8_kv": {"first": 0.05, "any": 0.08, "agreement": 0.5},
    "fp8_kv_vs_unquantized": {"first": 0.2, "any": 0.3, "agreement": 0.2},
}
EFFECT_FACTOR = 3.0


# ---------------------------------------------------------------- tiny models and adapters


def corpus() -> tuple[str, list[str]]:
    """Python's own json package source: a tokenizer corpus present on every machine. The pretraining
    text and the adapters' texts are parts of it."""
    import json as json_pkg

    files = sorted(Path(json_pkg.__file__).parent.glob("*.py"))
    text = "\n".join(f.read_text() for f in files)
    parts = [text[i : i + 3000] for i in range(0, 5 * 3000, 3000)]
    return text, parts


def fit(model: torch.nn.Module, ids: list[int], steps: int, lr: float, seed: int) -> float:
    """A few AdamW steps of next-token loss on random 64-token windows of ``ids``."""
    device = next(model.parameters()).device
    data = torch.tensor(ids, device=device)
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=rng).tolist()
        batch = torch.stack([data[s : s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build_base(root: Path, device: str) -> tuple[Path, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.tokenizer import build_bpe

    text, parts = corpus()
    tokenizer = build_bpe([text], vocab_size=1000)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    loss = fit(model, tokenizer.encode(parts[0] + parts[1]), steps=120, lr=3e-3, seed=0)
    path = root / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, {"vocab": len(tokenizer), "pretrain_loss": round(loss, 3)}


def train_lora(base: Path, out: Path, device: str, text: str, seed: int, lr: float, **lora) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    loss = fit(model, tokenizer.encode(text), steps=40, lr=lr, seed=seed)
    model.save_pretrained(out)
    return loss


def train_prompt(base: Path, out: Path, device: str, method: str, text: str, seed: int) -> Path:
    """The production save path (``save_unmerged``): model/ = base + adapter/ + marker."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.train.artifacts import save_unmerged

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    common = {"num_virtual_tokens": VIRTUAL, "task_type": "CAUSAL_LM"}
    config = {
        "prefix": lambda: peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=128, **common),
        "ptuning_v2": lambda: peft.PrefixTuningConfig(prefix_projection=False, **common),
        "prompt": lambda: peft.PromptTuningConfig(**common),
        "ptuning": lambda: peft.PromptEncoderConfig(encoder_hidden_size=128, **common),
    }[method]()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model = peft.get_peft_model(model, config)
    fit(model, tokenizer.encode(text), steps=40, lr=3e-2, seed=seed)
    save_unmerged(model, tokenizer, out, out, base)
    return out / "model"


# ---------------------------------------------------------------- running the engine


@dataclass
class Out:
    tokens: list[int]
    logits: list[torch.Tensor]  # one float32 row per generated token: the logits it was chosen from


class Recorder:
    """Keeps the logits of every prefill end and decode step of ``engine``'s backend, per request.

    Wraps the backend's own methods on the instance (restored by :meth:`detach`); clones stay on the
    device until the end, so recording adds no host sync to the decode loop."""

    def __init__(self, engine: Engine, prompts: list[list[int]]) -> None:
        self.backend, self.prompts = engine.backend, prompts
        self.slot: dict[int, int] = {}  # cache row -> LoRA slot
        self.owner: dict[int, tuple[int, int]] = {}  # cache row -> (slot, prompt index)
        self.steps: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        prefill, decode, set_adapter = self.backend.prefill, self.backend.decode, self.backend.set_adapter

        def on_set_adapter(row: int, slot: int) -> None:
            self.slot[row] = slot
            set_adapter(row, slot)

        def on_prefill(items):
            outs = prefill(items)
            for item, rows in zip(items, outs):
                if item.start == 0:
                    index = next(j for j, p in enumerate(prompts) if p[: len(item.ids)] == item.ids)
                    self.owner[item.row] = (self.slot.get(item.row, 0), index)
                key = self.owner[item.row]
                if item.start + len(item.ids) == len(prompts[key[1]]):
                    self.steps.setdefault(key, {})[0] = rows[-1].float().clone()
            return outs

        def on_decode(rows, positions, tokens):
            out = decode(rows, positions, tokens)
            copy = out.float().clone()
            for i, (row, position) in enumerate(zip(rows, positions)):
                key = self.owner[row]
                self.steps[key][position - len(prompts[key[1]]) + 1] = copy[i]
            return out

        self.backend.prefill, self.backend.decode, self.backend.set_adapter = on_prefill, on_decode, on_set_adapter

    def detach(self) -> None:
        for name in ("prefill", "decode", "set_adapter"):
            delattr(self.backend, name)

    def logits(self, slot: int, index: int) -> list[torch.Tensor]:
        steps = self.steps[(slot, index)]
        return [steps[k].cpu() for k in range(len(steps))]


def serve(engine: Engine, prompts: list[list[int]], requests: list[tuple[int, str | None]]) -> list[Out]:
    """Greedy completions of ``requests`` ((prompt index, adapter name or None)) with every step's logits."""
    recorder = Recorder(engine, prompts)
    results: list = [None] * len(requests)
    finished = threading.Semaphore(0)

    def sink_for(i: int) -> Callable:
        def sink(item) -> None:
            if isinstance(item, BaseException) or item.completion is not None:
                results[i] = item if isinstance(item, BaseException) else item.completion
                finished.release()

        return sink

    try:
        # Queued under the engine's (re-entrant) lock: the engine thread admits them all at once, in
        # this order, so a run's schedule does not depend on thread timing.
        with engine._cv:
            for i, (index, adapter) in enumerate(requests):
                engine.submit(prompts[index], GREEDY, sink_for(i), bounded=False, adapter=adapter)
        for _ in requests:
            if not finished.acquire(timeout=300):
                raise TimeoutError("the engine did not finish the requests within 300 s")
    finally:
        recorder.detach()
    outs = []
    for result, (index, adapter) in zip(results, requests):
        if isinstance(result, BaseException):
            raise result
        slot = engine.adapters.get(adapter, 0) if adapter else 0
        outs.append(Out(list(result.token_ids), recorder.logits(slot, index)))
    return outs


def engine_paths(engine: Engine) -> dict:
    backend = engine.backend
    graphs = getattr(backend, "graphs", None)
    return {"backend": backend.name, "ops": getattr(getattr(backend, "ops", None), "name", None),
            "cuda_graph_buckets": graphs.buckets if graphs is not None else None,
            "peak_batch": engine.stats["peak_batch"], "prefills": engine.stats["prefills"]}


def with_engine(make: Callable[[], Engine], run: Callable[[Engine], list[Out]]) -> tuple[list[Out], dict]:
    engine = make()
    try:
        return run(engine), engine_paths(engine)
    finally:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def serving_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32  # as loading.load_model picks


def merged_engine(base: Path, adapter: Path | None, device: str) -> Engine:
    """The adapter merged into the base (``merged_model``), served alone."""
    from transformers import AutoTokenizer

    return Engine(merged_model(base, adapter, device), AutoTokenizer.from_pretrained(base), CFG)


@contextlib.contextmanager
def torch_ops():
    """Engines built inside run the PyTorch ops (the CPU path) even on CUDA: a reference for the
    Triton kernels with everything else (cache dtype, schedule) the same. No CUDA graphs then."""
    from lmforge.serving import paged
    from lmforge.serving.ops import Ops

    pick = paged.pick_ops
    paged.pick_ops = lambda device, dtype: Ops()
    try:
        yield
    finally:
        paged.pick_ops = pick


def peft_model(model_dir: Path, device: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """peft's own model (``load_trained``) entirely in ``dtype`` (default: the serving dtype)."""
    from lmforge.train.artifacts import load_trained

    dtype = dtype or serving_dtype(device)
    return load_trained(model_dir, dtype=dtype, device=device).to(dtype)


def merged_model(base: Path, adapter: Path | None, device: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The base, or the adapter merged into it in float32, then cast to ``dtype`` (default: the serving dtype)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device=device, dtype=dtype or serving_dtype(device)).eval()


def _judged(result: dict) -> bool:
    """Pass/fail of one greedy+forced comparison. With a float32 noise floor (CUDA), the logits are
    judged against it (within twice the bf16 reference's own distance from float32) and the forced
    argmax agreement must hold; without one, by the fixed tolerances."""
    floor = result.get("noise_floor")
    if floor is None:
        return result["greedy"]["ok"] and result["forced"]["ok"]
    return floor["within_2x_floor"] and result["forced"]["argmax_agreement"] >= TOLERANCES["bfloat16"]["forced_agreement"]


def noise_floor(served: list[Out], ref_forced: list[Out], make_fp32: Callable[[], torch.nn.Module],
                prompts: list[list[int]]) -> dict:
    """Both the engine and the reference against the reference in float32 on the engine's tokens: in
    bf16 the reference itself is this far from exact, so the engine is judged against that floor."""
    exact = model_forced(make_fp32(), prompts, served)
    ours = compare_forced(served, exact, TOLERANCES["float32"])
    ref = compare_forced(ref_forced, exact, TOLERANCES["float32"])
    within = ours["max_logits_rel_l2"] <= max(2 * ref["max_logits_rel_l2"], 0.01)
    return {"engine_vs_fp32_max": ours["max_logits_rel_l2"], "reference_vs_fp32_max": ref["max_logits_rel_l2"],
            "engine_vs_fp32_first": ours["first_logits_rel_l2"], "reference_vs_fp32_first": ref["first_logits_rel_l2"],
            "within_2x_floor": within}


@torch.no_grad()
def model_greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[Out]:
    """Greedy by the model's full forward at every step (as ``artifacts.greedy_ids`` decodes
    prompt-learning models: peft's generate() drops prefixes under transformers 5)."""
    device = next(model.parameters()).device
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        tokens, logits = [], []
        for _ in range(NEW):
            row = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            tokens.append(int(row.argmax()))
            logits.append(row.float().cpu())
            ids = torch.cat([ids, ids.new_tensor([[tokens[-1]]])], dim=1)
        outs.append(Out(tokens, logits))
    return outs


@torch.no_grad()
def model_forced(model: torch.nn.Module, prompts: list[list[int]], served: list[Out]) -> list[Out]:
    """The model's logits at every step of the engine's own completions (teacher forcing), and its
    argmax there as its tokens."""
    device = next(model.parameters()).device
    outs = []
    for prompt, out in zip(prompts, served, strict=True):
        ids = torch.tensor([prompt + out.tokens[:-1]], device=device)
        # The last NEW rows: prompt tuning's output starts with rows for its virtual tokens.
        rows = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(out.tokens):].float().cpu()
        outs.append(Out(rows.argmax(-1).tolist(), list(rows)))
    return outs


# ---------------------------------------------------------------- comparing


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def compare(test: list[Out], ref: list[Out], tol: dict) -> dict:
    """Token agreement and logits errors of ``test`` against ``ref``, request by request."""
    agree = total = 0
    first = worst = 0.0
    diverged = []
    for i, (t, r) in enumerate(zip(test, ref, strict=True)):
        common = 0
        while common < len(r.tokens) and t.tokens[common] == r.tokens[common]:
            common += 1
        agree, total = agree + common, total + len(r.tokens)
        if common < len(r.tokens):
            diverged.append({"request": i, "step": common})
        for step in range(min(common + 1, len(r.tokens))):  # same history up to the first divergence
            err = rel_l2(t.logits[step], r.logits[step])
            worst = max(worst, err)
            first = max(first, err) if step == 0 else first
    agreement = agree / total
    ok = first <= tol["first"] and worst <= tol["any"] and agreement >= tol["agreement"]
    return {"ok": ok, "token_agreement": round(agreement, 4), "tokens_compared": total,
            "identical": agree == total, "first_logits_rel_l2": float(f"{first:.3g}"),
            "max_logits_rel_l2": float(f"{worst:.3g}"), "diverged": diverged[:8], "tol": tol}


def compare_forced(served: list[Out], forced: list[Out], tol: dict) -> dict:
    """The engine's logits against the reference's on the engine's own tokens, at every step."""
    agree = total = 0
    first = worst = 0.0
    for s, r in zip(served, forced, strict=True):
        agree += sum(a == b for a, b in zip(s.tokens, r.tokens))
        total += len(s.tokens)
        errors = [rel_l2(a, b) for a, b in zip(s.logits, r.logits, strict=True)]
        first, worst = max(first, errors[0]), max(worst, *errors)
    agreement = agree / total
    ok = first <= tol["first"] and worst <= tol["any"] and agreement >= tol["forced_agreement"]
    return {"ok": ok, "argmax_agreement": round(agreement, 4), "tokens_compared": total,
            "first_logits_rel_l2": float(f"{first:.3g}"), "max_logits_rel_l2": float(f"{worst:.3g}")}


def effect(adapted: list[Out], base: list[Out], tol: dict) -> dict:
    """How far an adapter moves the first-step logits from the base: a check whose adapters barely
    change the model would pass whatever the engine did with them."""
    errors = [rel_l2(a.logits[0], b.logits[0]) for a, b in zip(adapted, base, strict=True)]
    mean = sum(errors) / len(errors)
    return {"adapter_effect_rel_l2": {"mean": float(f"{mean:.3g}"), "min": float(f"{min(errors):.3g}")},
            "effect_ok": mean >= EFFECT_FACTOR * tol["first"]}


# ---------------------------------------------------------------- the checks


MIXED = [(p, name) for p in range(len(PROMPTS)) for name in (None, "a", "b")]  # 15 requests on 8 rows


class Checks:
    """The checks of the module docstring; engine runs shared between checks are computed once."""

    def __init__(self, root: Path, device: str) -> None:
        self.root, self.device = root, device
        self.cuda = device.startswith("cuda")
        self.tol = TOLERANCES["bfloat16" if self.cuda else "float32"]
        self.memo: dict[str, object] = {}

    def once(self, key: str, make: Callable):
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    # -------------------------------------------------------- artifacts

    def setup(self) -> dict:
        def build() -> dict:
            from transformers import AutoTokenizer

            base, info = build_base(self.root, self.device)
            _, parts = corpus()
            tokenizer = AutoTokenizer.from_pretrained(base)
            prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
            assert len({p[0] for p in prompts}) == len(prompts), "prompts must start with distinct tokens"
            # "a": a plain peft directory, rank 4 on q/v. "b": an lmforge run's adapter/, rank 8 rsLoRA everywhere.
            # (rsLoRA scales by alpha / sqrt(r): a smaller learning rate keeps its training stable.)
            info["lora_a_loss"] = round(train_lora(base, self.root / "lora-a", self.device, parts[2], 1, 2e-2, r=4,
                                                   lora_alpha=8, target_modules=["q_proj", "v_proj"]), 3)
            info["lora_b_loss"] = round(train_lora(
                base, self.root / "run-b" / "adapter", self.device, parts[3], 2, 5e-3, r=8, lora_alpha=16,
                use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]), 3)
            info["prompt_lengths"] = [len(p) for p in prompts]
            return {"base": base, "prompts": prompts, "info": info,
                    "adapters": {"a": str(self.root / "lora-a"), "b": str(self.root / "run-b")}}

        return self.once("setup", build)

    def prompt_dir(self, method: str) -> Path:
        s = self.setup()
        return self.once(f"dir-{method}", lambda: train_prompt(s["base"], self.root / method, self.device, method,
                                                                corpus()[1][4], 10 + METHODS.index(method)))

    def load(self, model_dir: Path, **cfg) -> Callable[[], Engine]:
        return lambda: Engine.load(model_dir, device=self.device, cfg=CFG.model_copy(update=cfg))

    def paths_ok(self, paths: dict, graphs: bool) -> bool:
        """On CUDA the engine must really take the Triton path, with or without captured graphs."""
        if not self.cuda:
            return paths["backend"] == "paged"
        captured = paths["cuda_graph_buckets"] is not None
        return paths["backend"] == "paged" and paths["ops"] == "triton" and captured == graphs

    # -------------------------------------------------------- engine runs shared by checks

    def base_alone(self) -> list[Out]:
        s = self.setup()
        every = [(p, None) for p in range(len(PROMPTS))]
        return self.once("base", lambda: with_engine(self.load(s["base"]), lambda e: serve(e, s["prompts"], every)))[0]

    def unmerged(self) -> tuple[list[Out], dict]:
        s = self.setup()
        return self.once("unmerged", lambda: with_engine(self.load(s["base"], adapters=s["adapters"]),
                                                         lambda e: serve(e, s["prompts"], MIXED)))

    def prompt_served(self, method: str) -> tuple[list[Out], dict]:
        s = self.setup()
        every = [(p, None) for p in range(len(PROMPTS))]
        return self.once(f"served-{method}", lambda: with_engine(self.load(self.prompt_dir(method)),
                                                                 lambda e: serve(e, s["prompts"], every)))

    # -------------------------------------------------------- checks

    def multi_lora(self) -> dict:
        s = self.setup()
        outs, paths = self.unmerged()
        every = [(p, None) for p in range(len(PROMPTS))]
        result: dict = {"paths": paths}
        refs = {}
        for name in (None, "a", "b"):
            adapter = Path(s["adapters"][name]) if name else None
            if adapter is not None and (adapter / "adapter").is_dir():
                adapter = adapter / "adapter"
            mine = [o for o, (_, n) in zip(outs, MIXED) if n == name]
            # Greedy: the merged adapter served alone. Forced: the merged HF model on the engine's tokens.
            refs[name] = self.base_alone() if name is None else with_engine(
                lambda: merged_engine(s["base"], adapter, self.device), lambda e: serve(e, s["prompts"], every))[0]
            forced = model_forced(merged_model(s["base"], adapter, self.device), s["prompts"], mine)
            result[name or "base"] = {"greedy": compare(mine, refs[name], self.tol),
                                      "forced": compare_forced(mine, forced, self.tol)}
            if self.cuda:
                result[name or "base"]["noise_floor"] = noise_floor(
                    mine, forced, lambda: merged_model(s["base"], adapter, self.device, torch.float32), s["prompts"])
            if name:
                result[name].update(effect(refs[name], refs[None], self.tol))
        parts = [_judged(result[k]) for k in ("base", "a", "b")]
        result["ok"] = (all(parts) and result["a"]["effect_ok"] and result["b"]["effect_ok"]
                        and self.paths_ok(paths, graphs=True) and paths["peak_batch"] == CFG.max_batch_size)
        return result

    def int8_multi_lora(self) -> dict:
        s = self.setup()
        ref, _ = self.unmerged()
        outs, paths = with_engine(self.load(s["base"], adapters=s["adapters"], quantization="int8"),
                                  lambda e: serve(e, s["prompts"], MIXED))
        result = compare(outs, ref, TOLERANCES["int8"])
        result["paths"] = paths
        result["ok"] = result["ok"] and self.paths_ok(paths, graphs=True)
        return result

    def graphs_vs_eager(self, which: str) -> dict:
        s = self.setup()
        if which == "lora":
            ref, _ = self.unmerged()
            model_dir, requests, extra = s["base"], MIXED, {"adapters": s["adapters"]}
        else:
            ref, _ = self.prompt_served("prefix")
            model_dir, requests, extra = self.prompt_dir("prefix"), [(p, None) for p in range(len(PROMPTS))], {}
        outs, paths = with_engine(self.load(model_dir, cuda_graphs=False, **extra),
                                  lambda e: serve(e, s["prompts"], requests))
        # Same schedule and kernels; only a decode step's padding to the graph's bucket differs.
        tol = dict(self.tol, any=self.tol["first"])
        result = compare(outs, ref, tol)
        result["paths"] = paths
        result["ok"] = result["ok"] and self.paths_ok(paths, graphs=False)
        return result

    def prompt_adapter(self, method: str) -> dict:
        s = self.setup()
        outs, paths = self.prompt_served(method)
        model = peft_model(self.prompt_dir(method), self.device)
        greedy = model_greedy(model, s["prompts"])
        forced = model_forced(model, s["prompts"], outs)
        result = {"greedy": compare(outs, greedy, self.tol), "forced": compare_forced(outs, forced, self.tol),
                  **effect(greedy, self.base_alone(), self.tol), "paths": paths}
        if self.cuda:
            result["noise_floor"] = noise_floor(
                outs, forced, lambda: peft_model(self.prompt_dir(method), self.device, torch.float32), s["prompts"])
        result["ok"] = _judged(result) and result["effect_ok"] and self.paths_ok(paths, graphs=True)
        return result

    def fp8_kv_prefix(self) -> dict:
        if self.cuda and torch.cuda.get_device_capability(self.device) < (8, 9):
            return {"ok": True, "skipped": "fp8 KV cache needs compute capability >= 8.9"}
        s = self.setup()
        every = [(p, None) for p in range(len(PROMPTS))]
        make = self.load(self.prompt_dir("prefix"), kv_cache_dtype="fp8")
        outs, paths = with_engine(make, lambda e: serve(e, s["prompts"], every))
        with torch_ops():
            ref, _ = with_engine(make, lambda e: serve(e, s["prompts"], every))
        result = compare(outs, ref, TOLERANCES["fp8_kv"])
        unquantized, _ = self.prompt_served("prefix")
        result["vs_unquantized"] = compare(outs, unquantized, TOLERANCES["fp8_kv_vs_unquantized"])
        result["paths"] = paths
        result["ok"] = result["ok"] and result["vs_unquantized"]["ok"] and self.paths_ok(paths, graphs=True)
        return result

    def all(self) -> list[tuple[str, Callable[[], dict]]]:
        checks = [("multi_lora", self.multi_lora), ("int8_multi_lora", self.int8_multi_lora),
                  ("graphs_vs_eager_lora", lambda: self.graphs_vs_eager("lora"))]
        checks += [(f"prompt_{m}", lambda m=m: self.prompt_adapter(m)) for m in METHODS]
        return checks + [("fp8_kv_prefix", self.fp8_kv_prefix),
                         ("graphs_vs_eager_prefix", lambda: self.graphs_vs_eager("prefix"))]


# ---------------------------------------------------------------- main


def environment(device: str) -> dict:
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    cap = ".".join(map(str, torch.cuda.get_device_capability(device))) if device.startswith("cuda") else None
    return {"device": device, "device_name": name, "capability": cap, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "dtype": str(serving_dtype(device)).removeprefix("torch.")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or tempfile.gettempdir()))
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "serve_gpu_check.jsonl"
    env = environment(args.device)
    started = time.perf_counter()
    failed = []
    with tempfile.TemporaryDirectory(prefix="serve-gpu-check-") as tmp, log_path.open("w") as log:
        checks = Checks(Path(tmp), args.device)

        def emit(record: dict) -> None:
            line = json.dumps(record)
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        emit({"check": "setup", **env, "tolerances": TOLERANCES, "effect_factor": EFFECT_FACTOR,
              "new_tokens": NEW, **checks.setup()["info"], "seconds": round(time.perf_counter() - started, 1)})
        wanted = set(filter(None, args.only.split(",")))
        for name, run in checks.all():
            if wanted and name not in wanted:
                continue
            t0 = time.perf_counter()
            try:
                record = run()
            except Exception as exc:  # noqa: BLE001 - one broken path must not hide the others' results
                record = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-2000:]}
            ok = bool(record.pop("ok"))
            emit({"check": name, "ok": ok, "device": args.device, "dtype": env["dtype"], **record,
                  "seconds": round(time.perf_counter() - t0, 1)})
            failed += [] if ok else [name]
    total = round(time.perf_counter() - started, 1)
    if failed:
        print(f"FAILED {len(failed)} check(s) on {env['device_name']}: {', '.join(failed)} "
              f"(details in {log_path}; {total} s)", file=sys.stderr)
        return 1
    print(f"all checks passed on {env['device_name']} in {total} s; results in {log_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
