"""The checks of ``python -m bench.serve.gpu_check`` (its docstring says what each compares and why).

One :class:`Checks` per run: the tiny base, its adapters and the engine runs that several checks
compare against are built once (``once``) and shared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from bench.serve.gpu_check.compare import (
    TOLERANCES,
    compare,
    compare_forced,
    effect,
    judged,
    noise_floor,
)
from bench.serve.gpu_check.engine import (
    CFG,
    merged_engine,
    serve,
    torch_ops,
    with_engine,
)
from bench.serve.gpu_check.models import (
    FULL,
    METHODS,
    MIXED,
    PROMPTS,
    Out,
    Scale,
    build_base,
    corpus,
    merged_model,
    model_forced,
    model_greedy,
    peft_model,
    train_lora,
    train_prompt,
)
from bench.serve.gpu_check.paths import PathChecks
from lmforge.config.base import updated
from lmforge.serving.engine import Engine

# The prefix cache is checked under LoRA adapters (with the base in the same batch) and under a prefix
# and a prompt-tuning adapter (virtual tokens before the prompt's blocks).
PREFIX_CACHE = ("lora", "prefix", "prompt")


class Checks:
    """The checks of ``bench.serve.gpu_check``'s docstring; engine runs shared between checks are computed once."""

    def __init__(self, root: Path, device: str, scale: Scale = FULL) -> None:
        self.root, self.device, self.scale = root, device, scale
        self.cuda = device.startswith("cuda")
        self.tol = TOLERANCES["bfloat16" if self.cuda else "float32"]
        self.memo: dict[str, object] = {}
        self.paths = PathChecks(self)

    def once(self, key: str, make: Callable):
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    # -------------------------------------------------------- artifacts

    def setup(self) -> dict:
        def build() -> dict:
            from transformers import AutoTokenizer

            base, info = build_base(self.root, self.device, self.scale)
            _, parts = corpus()
            tokenizer = AutoTokenizer.from_pretrained(base)
            prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
            assert len({p[0] for p in prompts}) == len(prompts), "prompts must start with distinct tokens"
            # "a": a plain peft directory, rank 4 on q/v. "b": an lmforge run's adapter/, rank 8 rsLoRA everywhere.
            # (rsLoRA scales by alpha / sqrt(r): a smaller learning rate keeps its training stable.)
            steps = self.scale.adapter_steps
            info["lora_a_loss"] = round(train_lora(base, self.root / "lora-a", self.device, parts[2], 1, 2e-2, steps,
                                                   r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 3)
            info["lora_b_loss"] = round(train_lora(
                base, self.root / "run-b" / "adapter", self.device, parts[3], 2, 5e-3, steps, r=8, lora_alpha=16,
                use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]), 3)
            info["prompt_lengths"] = [len(p) for p in prompts]
            return {"base": base, "prompts": prompts, "info": info,
                    "adapters": {"a": str(self.root / "lora-a"), "b": str(self.root / "run-b")}}

        return self.once("setup", build)

    def prompt_dir(self, method: str) -> Path:
        s = self.setup()
        return self.once(f"dir-{method}", lambda: train_prompt(s["base"], self.root / method, self.device, method,
                                                                corpus()[1][4], 10 + METHODS.index(method),
                                                                self.scale.adapter_steps))

    def adapter_path(self, name: str | None) -> Path | None:
        """LoRA adapter ``name``'s peft directory (an lmforge run keeps it in adapter/); None: the base."""
        if name is None:
            return None
        adapter = Path(self.setup()["adapters"][name])
        return adapter / "adapter" if (adapter / "adapter").is_dir() else adapter

    def fp8_skip(self) -> str | None:
        """Why the fp8 KV cache cannot run on this device, None when it can."""
        if self.cuda and torch.cuda.get_device_capability(self.device) < (8, 9):
            return "fp8 KV cache needs compute capability >= 8.9"
        return None

    def requests(self, engine: Engine, requests: list[tuple[int, str | None]]) -> list[Out]:
        """Greedy completions of ``requests`` ((prompt index, adapter)), every step's logits kept."""
        return serve(engine, self.setup()["prompts"], requests, self.scale.new)

    def load(self, model_dir: Path, **cfg) -> Callable[[], Engine]:
        """An engine factory over ``CFG`` with ``cfg`` laid over it (groups as mappings: runtime={...})."""
        return lambda: Engine.load(model_dir, device=self.device, cfg=updated(CFG, **cfg))

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
        return self.once("base", lambda: with_engine(self.load(s["base"]), lambda e: self.requests(e, every)))[0]

    def unmerged(self) -> tuple[list[Out], dict]:
        s = self.setup()
        return self.once("unmerged", lambda: with_engine(self.load(s["base"], adapters=s["adapters"]),
                                                         lambda e: self.requests(e, MIXED)))

    def prompt_served(self, method: str) -> tuple[list[Out], dict]:
        every = [(p, None) for p in range(len(PROMPTS))]
        return self.once(f"served-{method}", lambda: with_engine(self.load(self.prompt_dir(method)),
                                                                 lambda e: self.requests(e, every)))

    # -------------------------------------------------------- checks

    def multi_lora(self) -> dict:
        s = self.setup()
        outs, paths = self.unmerged()
        every = [(p, None) for p in range(len(PROMPTS))]
        result: dict = {"paths": paths}
        refs = {}
        for name in (None, "a", "b"):
            adapter = self.adapter_path(name)
            mine = [o for o, (_, n) in zip(outs, MIXED) if n == name]
            # Greedy: the merged adapter served alone. Forced: the merged HF model on the engine's tokens.
            refs[name] = self.base_alone() if name is None else with_engine(
                lambda adapter=adapter: merged_engine(s["base"], adapter, self.device),
                lambda e: self.requests(e, every))[0]
            forced = model_forced(merged_model(s["base"], adapter, self.device), s["prompts"], mine)
            result[name or "base"] = {"greedy": compare(mine, refs[name], self.tol),
                                      "forced": compare_forced(mine, forced, self.tol)}
            if self.cuda:
                result[name or "base"]["noise_floor"] = noise_floor(
                    mine, forced, lambda adapter=adapter: merged_model(s["base"], adapter, self.device, torch.float32),
                    s["prompts"])
            if name:
                result[name].update(effect(refs[name], refs[None], self.tol))
        parts = [judged(result[k]) for k in ("base", "a", "b")]
        result["ok"] = (all(parts) and result["a"]["effect_ok"] and result["b"]["effect_ok"]
                        and self.paths_ok(paths, graphs=True) and paths["peak_batch"] == CFG.scheduler.max_batch_size)
        return result

    def int8_multi_lora(self) -> dict:
        s = self.setup()
        ref, _ = self.unmerged()
        outs, paths = with_engine(self.load(s["base"], adapters=s["adapters"], runtime={"quantization": "int8"}),
                                  lambda e: self.requests(e, MIXED))
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
        outs, paths = with_engine(self.load(model_dir, runtime={"cuda_graphs": False}, **extra),
                                  lambda e: self.requests(e, requests))
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
        greedy = model_greedy(model, s["prompts"], self.scale.new)
        forced = model_forced(model, s["prompts"], outs)
        result = {"greedy": compare(outs, greedy, self.tol), "forced": compare_forced(outs, forced, self.tol),
                  **effect(greedy, self.base_alone(), self.tol), "paths": paths}
        if self.cuda:
            result["noise_floor"] = noise_floor(
                outs, forced, lambda: peft_model(self.prompt_dir(method), self.device, torch.float32), s["prompts"])
        result["ok"] = judged(result) and result["effect_ok"] and self.paths_ok(paths, graphs=True)
        return result

    def fp8_kv(self) -> dict:
        """fp8 KV cache with the base and both LoRA adapters (a prefix adapter is refused: fp8_kv_prefix_refused)."""
        skip = self.fp8_skip()
        if skip:
            return {"ok": True, "verdict": "skipped", "skipped": skip}
        s = self.setup()
        make = self.load(s["base"], adapters=s["adapters"], kv_cache={"dtype": "fp8"})
        outs, paths = with_engine(make, lambda e: self.requests(e, MIXED))
        with torch_ops():
            ref, _ = with_engine(make, lambda e: self.requests(e, MIXED))
        result = compare(outs, ref, TOLERANCES["fp8_kv"])
        unquantized, _ = self.unmerged()
        result["vs_unquantized"] = compare(outs, unquantized, TOLERANCES["fp8_kv_vs_unquantized"])
        result["paths"] = paths
        result["ok"] = result["ok"] and result["vs_unquantized"]["ok"] and self.paths_ok(paths, graphs=True)
        return result

    @staticmethod
    def names() -> list[str]:
        """The checks in the order they run (``--only`` is checked against these before any work)."""
        return ["multi_lora", "int8_multi_lora", "graphs_vs_eager_lora", *(f"prompt_{m}" for m in METHODS),
                "fp8_kv", "fp8_kv_prefix_refused", "graphs_vs_eager_prefix",
                *(f"prefix_cache_{w}" for w in PREFIX_CACHE), "structured_graphs", "speculative_ngram",
                "runtime_adapters"]

    def all(self) -> list[tuple[str, Callable[[], dict]]]:
        new = self.paths
        checks = [self.multi_lora, self.int8_multi_lora, lambda: self.graphs_vs_eager("lora")]
        checks += [lambda m=m: self.prompt_adapter(m) for m in METHODS]
        checks += [self.fp8_kv, new.fp8_kv_prefix_refused, lambda: self.graphs_vs_eager("prefix")]
        checks += [lambda w=w: new.prefix_cache(w) for w in PREFIX_CACHE]
        checks += [new.structured_graphs, new.speculative_ngram, new.runtime_adapters]
        return list(zip(self.names(), checks, strict=True))
