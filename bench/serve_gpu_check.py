"""Device check of the serving engine's adapter and quantization paths against references.

    PYTHONPATH=src python bench/serve_gpu_check.py [--device cuda|cpu] [--out DIR]

The CPU tests never run the paths the engine takes on CUDA (Triton kernels, decode steps replayed
from captured CUDA graphs, the int8 Triton matmul, the fp8 KV cache on Hopper). This script builds a
tiny Llama on the fly (byte-level BPE of ~1000 entries from ``lmforge.tokenizer.build.build_bpe``, hidden
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
peft, tokenizers, safetensors, pydantic (no pytest, ray or mlflow). 44 s on an H100; about 1 minute
on 2 CPU cores, where every comparison is float32. Beside it: ``_gpu_check_models.py`` (tiny models,
adapters, reference models), ``_gpu_check_engine.py`` (running the engine and keeping its logits),
``_gpu_check_compare.py`` (comparisons, tolerances, the float32 noise floor used on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_check_compare import EFFECT_FACTOR, TOLERANCES, compare, compare_forced, effect, judged, noise_floor  # noqa: E402
from _gpu_check_engine import CFG, merged_engine, serve, torch_ops, with_engine  # noqa: E402
from _gpu_check_models import (NEW, Out, build_base, corpus, merged_model, model_forced, model_greedy,  # noqa: E402
                               peft_model, serving_dtype, train_lora, train_prompt)

from lmforge.serving.engine import Engine  # noqa: E402

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



# ---------------------------------------------------------------- tiny models and adapters












# ---------------------------------------------------------------- running the engine






























# ---------------------------------------------------------------- comparing










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
        parts = [judged(result[k]) for k in ("base", "a", "b")]
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
        result["ok"] = judged(result) and result["effect_ok"] and self.paths_ok(paths, graphs=True)
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
