"""The checks of the serving paths issue 19 added, for ``python -m bench.serve.gpu_check`` (criteria in its
docstring): prefix-cache hits under adapters, structured-output masks on the logits of CUDA-graph decode
steps, n-gram speculative decoding, LoRA adapters loaded while serving, and the fp8 KV cache's refusal
of a prompt-learning prefix.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.serve.gpu_check.compare import (
    TIE_ABS,
    TIE_FACTOR,
    TOLERANCES,
    compare,
    compare_forced,
    floor_verdict,
    same_unless_tied,
)
from bench.serve.gpu_check.engine import serve, with_engine
from bench.serve.gpu_check.models import MIXED, Out, merged_model, model_forced, peft_model
from lmforge.core.errors import ServingError
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.sampling import ResponseFormat

if TYPE_CHECKING:
    from bench.serve.gpu_check.checks import Checks

# A shared "system prompt" of several KV blocks (16 tokens each) before distinct questions: the second
# time they are sent, every request finds its full blocks in the prefix cache.
SHARED = ("Return a JSON string representation of a Python data structure. If skipkeys is true then dict keys "
          "that are not basic types will be skipped instead of raising a TypeError.\n")
QUESTIONS = ["def encode(self, o):", "class JSONEncoder(object):", "import re", "x"]
# Bounded schemas (enums, booleans, no free strings or numbers): a compact grammar then ends every
# output within a few dozen tokens, so each request finishes (finish_reason stop) and must validate.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"enum": ["encode", "decode", "dumps"]}, "strict": {"type": "boolean"}},
     "required": ["name", "strict"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "pos": {
        "type": "object", "properties": {"line": {"enum": [1, 2, 3]}}, "required": ["line"],
        "additionalProperties": False}}, "required": ["ok", "pos"], "additionalProperties": False},
]
STRUCTURED_MAX_TOKENS = 64
SPECULATIVE = {"method": "ngram", "num_tokens": 4}


class PathChecks:
    """The new-path checks, sharing :class:`Checks`' tiny base, adapters and memoized engine runs."""

    def __init__(self, checks: Checks) -> None:
        self.c = checks

    def shared_prompts(self) -> list[list[int]]:
        def build() -> list[list[int]]:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.c.setup()["base"])
            return [tokenizer.encode(SHARED + q, add_special_tokens=False) for q in QUESTIONS]

        return self.c.once("shared-prompts", build)

    def judge_forced(self, outs: list[Out], prompts: list[list[int]],
                     make: Callable[[torch.dtype | None], torch.nn.Module]) -> tuple[dict, list[Out]]:
        """``outs`` against the reference ``make(dtype)`` forced on their tokens: on CUDA by the float32
        noise floor, on the CPU (all float32) by the float32 tolerances. Also the float32 forced logits."""
        ref = model_forced(make(None), prompts, outs)
        result: dict = {"forced": compare_forced(outs, ref, self.c.tol)}
        if not self.c.cuda:
            result["ok"] = result["forced"]["ok"]
            return result, ref
        exact = model_forced(make(torch.float32), prompts, outs)
        result["noise_floor"] = floor_verdict(outs, ref, exact)
        result["ok"] = (result["noise_floor"]["within_floor"]
                        and result["forced"]["argmax_agreement"] >= TOLERANCES["bfloat16"]["forced_agreement"])
        return result, exact

    def reference(self, model_dir: Path, adapter: str | None) -> Callable[[torch.dtype | None], torch.nn.Module]:
        """The reference model of requests for ``adapter`` on ``model_dir``: the LoRA merged into the base,
        or peft's own prompt-learning model."""
        if model_dir == self.c.setup()["base"]:
            path = self.c.adapter_path(adapter)
            return lambda dtype: merged_model(model_dir, path, self.c.device, dtype)
        return lambda dtype: peft_model(model_dir, self.c.device, dtype)

    # -------------------------------------------------------- checks

    def prefix_cache(self, which: str) -> dict:
        """The same requests twice on one engine (the second time from the prefix cache) against an engine
        with caching off and against the reference: ``which`` is 'lora' (base, a and b mixed) or a
        prompt-learning method."""
        s = self.c.setup()
        prompts, new = self.shared_prompts(), self.c.scale.new
        if which == "lora":
            model_dir, extra, names = s["base"], {"adapters": s["adapters"]}, (None, "a", "b")
        else:
            model_dir, extra, names = self.c.prompt_dir(which), {}, (None,)
        requests = [(p, n) for p in range(len(prompts)) for n in names]

        def twice(engine: Engine) -> tuple[list[Out], list[Out]]:
            return serve(engine, prompts, requests, new), serve(engine, prompts, requests, new)

        uncached, _ = with_engine(self.c.load(model_dir, kv_cache={"prefix_caching": False}, **extra),
                                  lambda e: serve(e, prompts, requests, new))
        (cold, warm), paths = with_engine(self.c.load(model_dir, **extra), twice)
        result: dict = {"cached_tokens": [o.cached_tokens for o in warm],
                        "cold_cached_tokens": [o.cached_tokens for o in cold], "paths": paths,
                        # Same kernels; only where the prefill starts differs: the strict tolerance at every step.
                        "vs_uncached": compare(warm, uncached, dict(self.c.tol, any=self.c.tol["first"])),
                        # The first pass, admitted at once: all but the first request of each adapter borrow
                        # its blocks while the same forward writes them (model/kv_cache.py).
                        "cold_vs_uncached": compare(cold, uncached, dict(self.c.tol, any=self.c.tol["first"]))}
        hits = all(o.cached_tokens > 0 for o in warm) and sum(o.cached_tokens > 0 for o in cold) >= len(cold) - len(names)
        keys = {name: name or ("base" if which == "lora" else which) for name in names}
        for name, key in keys.items():
            mine = [i for i, (_, n) in enumerate(requests) if n == name]
            result[key], _ = self.judge_forced([warm[i] for i in mine], [prompts[requests[i][0]] for i in mine],
                                               self.reference(model_dir, name))
        result["ok"] = (hits and result["vs_uncached"]["ok"] and result["cold_vs_uncached"]["ok"]
                        and all(result[k]["ok"] for k in keys.values())
                        and self.c.paths_ok(paths, graphs=True))
        return result

    def structured_graphs(self) -> dict:
        """json_schema requests mixed with free ones in one batch, CUDA graphs on and off: every constrained
        output finishes, parses and validates, and the two runs agree."""
        import jsonschema

        s = self.c.setup()
        free = SamplingParams(max_tokens=self.c.scale.new, temperature=0, ignore_eos=True)
        requests, params = [], []
        for p in range(len(s["prompts"])):
            for schema in [*SCHEMAS, None]:
                requests.append((p, None))
                params.append(free if schema is None else SamplingParams(
                    max_tokens=STRUCTURED_MAX_TOKENS, temperature=0,
                    response_format=ResponseFormat("json_schema", json.dumps(schema))))
        schemas = [schema for _ in s["prompts"] for schema in [*SCHEMAS, None]]
        runs = {}
        for graphs in (True, False):
            runs[graphs] = with_engine(self.c.load(s["base"], runtime={"cuda_graphs": graphs}),
                                       lambda e: serve(e, s["prompts"], requests, params=params))
        invalid = []
        for i, (out, schema) in enumerate(zip(runs[True][0], schemas)):
            if schema is None:
                continue
            try:
                if out.finish_reason != "stop":
                    raise ValueError(f"finish_reason {out.finish_reason} after {len(out.tokens)} tokens")
                jsonschema.validate(json.loads(out.text), schema)
            except (ValueError, jsonschema.ValidationError) as exc:
                invalid.append({"request": i, "text": out.text[:200], "error": str(exc)[:200]})
        # Same schedule and kernels; only a decode step's padding to the graph's bucket differs.
        result = compare(runs[True][0], runs[False][0], dict(self.c.tol, any=self.c.tol["first"]))
        result.update(constrained=sum(x is not None for x in schemas), invalid=invalid[:8],
                      paths={"graphs": runs[True][1], "eager": runs[False][1]})
        result["ok"] = (result["ok"] and not invalid and self.c.paths_ok(runs[True][1], graphs=True)
                        and self.c.paths_ok(runs[False][1], graphs=False))
        return result

    def speculative_ngram(self) -> dict:
        """n-gram speculative decoding: its logits (plain decode and verify steps) against the reference, and
        its greedy tokens equal to plain decoding's but at near-ties of the float32 reference."""
        s = self.c.setup()
        every = [(p, None) for p in range(len(s["prompts"]))]

        def run(engine: Engine) -> tuple[list[Out], dict]:
            outs = self.c.requests(engine, every)
            return outs, dict(getattr(engine.speculator, "stats", {}))

        (outs, stats), paths = with_engine(self.c.load(s["base"], speculative=SPECULATIVE), run)
        result, exact = self.judge_forced(outs, s["prompts"], self.reference(s["base"], None))
        noise = result.get("noise_floor", {}).get("reference_abs_noise", 0.0)
        result["tokens_vs_plain"] = same_unless_tied(outs, self.c.base_alone(), exact, max(TIE_FACTOR * noise, TIE_ABS))
        result.update(speculator=stats, paths=paths)
        # The verify path must really run: guesses were proposed and verified in a forward of several positions.
        exercised = stats.get("proposed", 0) > 0 and stats.get("verify_steps", 0) > 0
        result["ok"] = result["ok"] and result["tokens_vs_plain"]["ok"] and exercised and paths["backend"] == "paged"
        return result

    def runtime_adapters(self) -> dict:
        """LoRA adapters loaded while serving give the logits of the same adapters loaded at start-up (same
        slots' shape), again after an unload and a reload, and with one device slot (swapped per request)."""
        from lmforge.serving.adapters.lora_slots import LoraAdapter, read_adapter

        s = self.c.setup()
        slots = {"max_loras": 2}
        startup, _ = with_engine(self.c.load(s["base"], adapters=s["adapters"], lora=slots),
                                 lambda e: self.c.requests(e, MIXED))

        def load_all(engine: Engine) -> dict[str, int]:
            pool = engine.backend.lora
            assert pool is not None, "serving.lora.max_loras is set: the engine must have an adapter pool"
            # Newer pools take the adapter's source (a function that reads it again after an eviction).
            sourced = "source" in inspect.signature(pool.add).parameters
            for name, path in s["adapters"].items():
                def read(name: str = name, path: str = path) -> LoraAdapter:
                    return read_adapter(name, Path(path), engine.model)  # as POST /v1/load_lora_adapter reads it

                with engine.admission_held():
                    pool.add(read(), read) if sourced else pool.add(read())
            return dict(pool.ids)

        def reloaded(engine: Engine) -> dict:
            first_ids = load_all(engine)
            first = self.c.requests(engine, MIXED)
            with engine.admission_held():
                for name in s["adapters"]:
                    engine.backend.lora.remove(name)
            again_ids = load_all(engine)
            return {"first": first, "again": self.c.requests(engine, MIXED), "ids": [first_ids, again_ids]}

        def swapped(engine: Engine) -> list[Out]:
            load_all(engine)
            return self.c.requests(engine, MIXED)

        runs, paths = with_engine(self.c.load(s["base"], lora=slots), reloaded)
        one_slot, _ = with_engine(self.c.load(s["base"], lora={"max_loras": 1, "max_cpu_loras": 2}), swapped)
        strict = dict(self.c.tol, any=self.c.tol["first"])  # same slots, schedule and kernels
        result = {"loaded": compare(runs["first"], startup, strict), "reloaded": compare(runs["again"], startup, strict),
                  # One slot: a and b take turns, so rows decode in other batches: the ordinary tolerances.
                  "one_slot": compare(one_slot, startup, self.c.tol), "ids": runs["ids"], "paths": paths}
        fresh = not set(runs["ids"][0].values()) & set(runs["ids"][1].values())  # a reload is a new identity
        result["ok"] = (fresh and all(result[k]["ok"] for k in ("loaded", "reloaded", "one_slot"))
                        and self.c.paths_ok(paths, graphs=True))
        return result

    def fp8_kv_prefix_refused(self) -> dict:
        """An fp8 KV cache with a prompt-learning prefix must be refused at load, naming the fix: an
        expected refusal is this check's pass, a load that succeeds its failure."""
        skip = self.c.fp8_skip()
        if skip:
            return {"ok": True, "verdict": "skipped", "skipped": skip}
        try:
            engine = self.c.load(self.c.prompt_dir("prefix"), kv_cache={"dtype": "fp8"})()
        except ServingError as exc:
            named = "serving.kv_cache.dtype: bf16" in exc.fix
            return {"ok": named, "verdict": "refused" if named else "fail", "error": exc.cause, "fix": exc.fix}
        engine.close()
        return {"ok": False, "verdict": "fail", "error": "the engine loaded an fp8 KV cache with a prefix adapter; "
                "it must refuse it (ServingError naming serving.kv_cache.dtype: bf16)"}
