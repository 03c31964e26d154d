"""GPU engine benchmark: a Llama-shaped 1.1B model (random bf16 weights), prompts of 256 tokens,
256 new tokens, one stream and 64 concurrent, against transformers ``generate()`` in the same job.

    PYTHONPATH=src python -m bench.serve.gpu [--phases check engine poisson hf compile nographs int8 quant] [--out DIR]
    python -m bench.serve.gpu --tiny --phases check engine poisson hf nooverlap nographs unfused eagerprefill int8  # CPU

Phases: ``check`` (Triton kernels against the PyTorch ops on random inputs; the engine's logits and
greedy tokens against transformers), ``engine`` (our tokens/s; and one streamed request's time to first token
and inter-token gap, which split the one-stream figure into prefill and decode), ``poisson`` (time-to-first-token
and inter-token latency under Poisson arrivals, straight into the engine), ``hf`` (plain
``generate()``), ``compile`` (``generate()`` with a static cache, which transformers compiles with
torch.compile; each time-boxed), ``nooverlap``, ``nographs`` and ``unfused`` (our engine without launching a
decode step ahead, without CUDA graphs, and with rope_store as a kernel of its own in decode steps:
``serving.runtime.fused_attention`` off), ``eagerprefill`` (our engine with a lone prompt's prefill run
eagerly, its prefill graphs dropped: time to first token and tokens/s), ``int8`` (weight-only
int8: logits error and tokens/s), ``profile`` (top GPU kernels of a decode step, to profile.txt),
``quant`` (every quantization option's speed and held-out perplexity change: ``bench.serve.quant``).
Each figure is appended to ``OUT/serve_gpu.jsonl`` (default ``bench/results``) as soon as it is
measured. Needs only torch, transformers and triton (and pydantic, which lmforge's config uses).
``--tiny``: a 2-layer model on the CPU, short prompts, 4 concurrent (a check of this script); the
Triton kernel check, ``profile`` and ``quant`` need a GPU and are skipped there.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.common.record import record
from bench.common.serve import (
    LLAMA_1B,
    LLAMA_TINY,
    engine_tokens_per_s,
    generate_tokens_per_s,
    median_stream_timing,
    poisson_engine,
    random_llama,
    random_prompts,
    word_tokenizer,
)
from lmforge.config.serving import RuntimeConfig, SchedulerConfig, ServingConfig
from lmforge.serving.engine import Engine, SamplingParams

PHASES = ("check", "engine", "poisson", "profile", "hf", "nooverlap", "nographs", "unfused", "eagerprefill", "compile",
          "int8", "quant")


@dataclass(frozen=True)
class Workload:
    """The model's shape, the requests (prompt and new tokens, how many at once) and the Poisson rates."""

    shape: dict
    prompt: int
    new: int
    concurrent: int
    rates: tuple[float, ...]
    min_requests: int  # per rate: max(min_requests, 6 * rate)

    @property
    def vocab(self) -> int:
        return self.shape["vocab_size"]


FULL = Workload(LLAMA_1B, prompt=256, new=256, concurrent=64, rates=(4.0, 16.0, 48.0), min_requests=24)
TINY = Workload(LLAMA_TINY, prompt=16, new=8, concurrent=4, rates=(20.0,), min_requests=4)


def _batch(concurrent: int) -> SchedulerConfig:
    """A running batch of ``concurrent`` requests, and a queue long enough for every row's requests."""
    return SchedulerConfig(max_batch_size=concurrent, max_queue=4096)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def check_kernels() -> dict[str, float]:
    """Triton kernels against the PyTorch ops, bf16, random inputs of the 1.1B model's shapes."""
    from lmforge.serving.model.ops import Ops, StepLayout, TritonOps

    ref, tri, dev = Ops(), TritonOps(), torch.device("cuda")
    out: dict[str, float] = {}
    x, r = (torch.randn(37, 2048, device=dev, dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(2048, device=dev, dtype=torch.bfloat16)
    a, b = ref.add_rms_norm(x, r, w, 1e-5), tri.add_rms_norm(x, r, w, 1e-5)
    out["add_rms_norm"] = max(rel_err(a[0], b[0]), rel_err(a[1], b[1]))
    gu = torch.randn(37, 2 * 5632, device=dev, dtype=torch.bfloat16)
    out["silu_mul"] = rel_err(tri.silu_mul(gu), ref.silu_mul(gu))
    heads, kvh, hd, bs, rows = 32, 4, 64, 16, 6
    table = torch.randperm(400, device=dev)[: (rows + 1) * 40].reshape(rows + 1, 40).int()
    kc = torch.randn(400 * bs, kvh, hd, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    # Rope tables repeat their first half (cat(freqs, freqs)); the kernel relies on it.
    cos, sin = (torch.randn(640, hd // 2, device=dev, dtype=torch.bfloat16).repeat(1, 2) for _ in range(2))
    for name, items, tpb in [("prefill", [(0, 0, list(range(300))), (3, 17, list(range(45)))], 16),
                             ("decode", [(i, 13 + 97 * i, [5]) for i in range(rows)], 1)]:
        layout = StepLayout.build(items, dev, tpb, None)
        qkv = torch.randn(layout.tokens.shape[0], (heads + 2 * kvh) * hd, device=dev, dtype=torch.bfloat16)
        slots = table[layout.rows, layout.positions // bs].long() * bs + layout.positions % bs
        k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        q1 = ref.rope_store(qkv, cos, sin, layout.positions, slots, k1, v1, heads, kvh, hd)
        q2 = tri.rope_store(qkv, cos, sin, layout.positions, slots, k2, v2, heads, kvh, hd)
        out[f"rope_store_{name}"] = max(rel_err(q2, q1), rel_err(k2, k1), rel_err(v2, v1))
        o1 = ref.attention(q1, k1, v1, table, layout, bs, hd**-0.5)
        o2 = tri.attention(q1, k1, v1, table, layout, bs, hd**-0.5)
        out[f"attention_{name}"] = rel_err(o2, o1)
    return out


def check_logits(engine: Engine, model, vocab: int) -> dict[str, float]:
    """The paged runner's logits against the model's own forward, for a prefill (eager, and the lone prompt's
    graph: its last token) and one decode step."""
    from lmforge.serving.backends.base import PrefillItem

    prompt = random_prompts(1, 100, vocab, seed=12)[0]
    backend = engine.backend  # the engine thread is idle between requests: safe to borrow
    graphs = getattr(backend, "prefill_graphs", None)
    replays = graphs.replays if graphs is not None else 0
    row = backend.reserve(128)
    try:
        with torch.inference_mode():
            pre = backend.prefill([PrefillItem(row, 0, prompt, all_logits=True)])[0]  # eager (all logits)
            # The lone prompt's prefill graph (last token only; padded to 128): it rewrites the same cache rows.
            last = backend.prefill([PrefillItem(row, 0, prompt)])[0][-1:].clone()
            dec = backend.decode([row], [100], [7])[0:1].clone()
            ref = model(torch.tensor([[*prompt, 7]], device=model.device)).logits[0]
    finally:
        backend.release(row)
    with torch.inference_mode():  # the noise floor: the model's own forward in bf16 against float32
        exact = copy.deepcopy(model).float()
        floor = rel_err(ref, exact(torch.tensor([[*prompt, 7]], device=model.device)).logits[0])
        del exact
    replayed = (graphs.replays if graphs is not None else 0) - replays  # 0 on the CPU: that prefill was eager
    return {"logits_rel_err_prefill": rel_err(pre, ref[:100]), "logits_rel_err_decode": rel_err(dec, ref[100:]),
            "logits_rel_err_prefill_graph_last": rel_err(last, ref[99:100]), "prefill_graph_replays": replayed,
            "logits_rel_err_transformers_bf16_vs_fp32": floor}


def check_greedy(engine: Engine, model, vocab: int) -> dict[str, float]:
    """Greedy tokens of the engine against generate() (bf16: kernels that round differently may
    flip a near-tie, after which the two continuations differ)."""
    prompts = random_prompts(4, 64, vocab, seed=11)
    ours = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    ids = torch.tensor(prompts, device=model.device)
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             pad_token_id=0)[:, 64:].tolist()
    agree = []
    for o, r in zip(ours, ref):
        same = next((i for i, (a, b) in enumerate(zip(o.token_ids, r)) if a != b), len(r))
        agree.append(same)
    return {"greedy_prefix_match_mean": sum(agree) / len(agree), "greedy_full_matches": sum(a == 32 for a in agree)}


class Budget(Exception):
    """A baseline ran past its time box (torch.compile can take minutes)."""


def time_boxed(seconds: int, fn, *args, **kwargs):
    """``fn(*args)``, or :class:`Budget` after ``seconds`` (SIGALRM; the main thread only)."""
    def expire(*_):
        raise Budget(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def engine_phases(engine: Engine, model, phases: set[str], put, one, many, w: Workload) -> dict[str, float]:
    ours: dict[str, float] = {}
    many_n = str(w.concurrent)
    if "check" in phases:
        for name, value in {**check_logits(engine, model, w.vocab), **check_greedy(engine, model, w.vocab)}.items():
            unit = "relative L2 error vs transformers forward" if "err" in name else "tokens of 32"
            unit = "prefills served from a captured graph" if "replays" in name else unit
            put(name, value, "of 4 prompts" if "full" in name else unit)
    if "engine" in phases:
        ours["1"] = engine_tokens_per_s(engine, one, w.new)
        ours[many_n] = engine_tokens_per_s(engine, many, w.new)
        put("engine_1_stream_tok_s", ours["1"], "output tok/s")
        put(f"engine_{many_n}_concurrent_tok_s", ours[many_n], "output tok/s")
        # Where one stream's time goes: the prefill's share (time to first token) and a decode step (fresh
        # prompts of the same length: the timed ones are in the prefix cache by now); medians of three requests.
        timing = median_stream_timing(engine, w.prompt, w.new)
        ours["ttft_ms"] = 1e3 * timing["ttft"]
        put("engine_1_stream_ttft_ms", 1e3 * timing["ttft"], f"ms to the first token of a {w.prompt}-token prompt "
            "(median of 3 requests)")
        put("engine_1_stream_itl_p50_ms", 1e3 * timing["itl_p50"], "ms between tokens, median (streamed, one request)")
        put("engine_1_stream_itl_mean_ms", 1e3 * timing["itl_mean"], "ms between tokens, mean")
    if "poisson" in phases:
        for rate in w.rates:
            res = poisson_engine(engine, rate, int(max(w.min_requests, rate * 6)), w.prompt, w.new)
            for key in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "output_tok_s"):
                put(f"poisson_{rate:g}rps_{key}", res[key], "tok/s" if key == "output_tok_s" else "s")
    return ours


def baseline_phases(model, phases: set[str], put, one, many, ours: dict[str, float], box_s: int,
                    w: Workload) -> None:
    if "hf" in phases:  # plain generate() is CPU-bound per step; 64 new tokens give its rate well enough
        for n, prompts in (("1", one), (str(w.concurrent), many)):
            rate = generate_tokens_per_s(model, prompts, min(64, w.new))
            put(f"generate_{n}_tok_s", rate, "output tok/s (64 new tokens)")
            if n in ours:
                put(f"engine_{n}_tok_s_vs_generate", ours[n], "output tok/s", "transformers generate() (same job)",
                    rate)
    if "compile" in phases:
        for n, prompts in (("1", one), (str(w.concurrent), many)):
            t0 = time.perf_counter()
            try:
                rate = time_boxed(box_s, generate_tokens_per_s, model, prompts, w.new, cache_implementation="static")
            except Budget as exc:
                print(f"generate() static+compile batch {n}: {exc}; not recorded", flush=True)
                continue
            put(f"generate_static_compile_{n}_tok_s", rate,
                f"output tok/s (warm-up incl. compile {time.perf_counter() - t0:.0f} s)")
            if n in ours:
                put(f"engine_{n}_tok_s_vs_static_compile", ours[n], "output tok/s",
                    "generate() static cache + torch.compile (same job)", rate)


def variant_phases(model, tokenizer, phases: set[str], put, one, many, ours: dict[str, float], w: Workload) -> None:
    """The engine without CUDA graphs, and with int8 weights (this last: it quantizes ``model``)."""
    pairs = (("1", one), (str(w.concurrent), many))
    # The engine with one feature off: phase -> (runtime setting, record name, the feature, timed runs).
    ablations = {
        "nographs": ({"cuda_graphs": False}, "no_cuda_graphs", "CUDA graphs", 1),
        # diagnosis: no decode launched ahead of the previous step's text handling
        "nooverlap": ({"overlap_decode": False}, "no_overlap", "overlap", 3),
        # rope_store before the attention kernel in decode steps, as prefill chunks run it
        "unfused": ({"fused_attention": False}, "unfused", "fused attention", 3),
    }
    for phase, (runtime, name, feature, repeats) in ablations.items():
        if phase not in phases:
            continue
        engine = Engine(model, tokenizer, ServingConfig(scheduler=_batch(w.concurrent), runtime=RuntimeConfig(**runtime)))
        for n, prompts in pairs:
            put(f"engine_{name}_{n}_tok_s", engine_tokens_per_s(engine, prompts, w.new, repeats=repeats), "output tok/s",
                f"engine with {feature} (same job)", ours.get(n))
        engine.close()
    if "eagerprefill" in phases:  # diagnosis: what the lone prompt's prefill graphs are worth
        engine = Engine(model, tokenizer, ServingConfig(scheduler=_batch(w.concurrent), max_new_tokens=w.new))
        engine.backend.prefill_graphs = None  # type: ignore[attr-defined]  # the paged backend's; None: eager
        put("engine_eager_prefill_1_tok_s", engine_tokens_per_s(engine, one, w.new), "output tok/s",
            "engine with prefill graphs (same job)", ours.get("1"))
        put("engine_eager_prefill_1_stream_ttft_ms", 1e3 * median_stream_timing(engine, w.prompt, w.new)["ttft"],
            f"ms to the first token of a {w.prompt}-token prompt (median of 3 requests)",
            "engine with prefill graphs (same job)", ours.get("ttft_ms"), higher_is_better=False)
        engine.close()
    if "int8" in phases:
        from lmforge.serving.quant.quantize import quantize_int8

        prompt = torch.tensor(one, device=model.device)
        with torch.inference_mode():
            before = model(prompt).logits.float()
            quantize_int8(model)
            after = model(prompt).logits.float()
        put("int8_logits_rel_err", rel_err(after, before), "relative L2 error vs bf16 weights")
        engine = Engine(model, tokenizer, ServingConfig(scheduler=_batch(w.concurrent)))
        for n, prompts in pairs:
            put(f"engine_int8_{n}_tok_s", engine_tokens_per_s(engine, prompts, w.new, repeats=1), "output tok/s",
                "engine with bf16 weights (same job)", ours.get(n))
        engine.close()


def profile_decode(engine: Engine, out_dir: Path | None) -> None:
    """Top GPU kernels of 20 captured decode steps at batch 1 and 64 (written to profile.txt)."""
    from torch.profiler import ProfilerActivity, profile

    backend = engine.backend
    lines = []
    for batch in (1, 64):
        rows = [backend.reserve(512) for _ in range(batch)]
        try:
            with torch.inference_mode():
                backend.decode(rows, [300] * batch, [5] * batch)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        backend.decode(rows, [300] * batch, [5] * batch).argmax(-1).tolist()
        finally:
            for row in rows:
                backend.release(row)
        lines.append(f"== batch {batch}: 20 decode steps at position 300")
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    text = "\n".join(lines)
    print(text[:6000])
    if out_dir is not None:
        (out_dir / "profile.txt").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", default=list(PHASES), metavar="PHASE", help=" ".join(PHASES))
    parser.add_argument("--train-s", type=float, default=60.0, help="quant phase: training time box of its model")
    parser.add_argument("--compile-box-s", type=int, default=100, help="time box of each compiled baseline")
    add_common_arguments(parser, "a 2-layer model on the CPU, short requests: a check of this script")
    args = parser.parse_args()
    chosen = choose(args.phases, PHASES, "phase", "--phases")
    phases, out = set(chosen), out_dir(args)
    w = TINY if args.tiny else FULL
    dev, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (--tiny check)"
    command = " ".join(["PYTHONPATH=src python -m bench.serve.gpu", *(["--tiny"] if args.tiny else []),
                        "--phases", *chosen])
    figures: dict[str, float] = {}

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None,
            higher_is_better: bool = True) -> None:
        figures[metric] = value
        record("serve_gpu", metric, value, unit, baseline, baseline_value, device=device, command=command,
               higher_is_better=higher_is_better, out_dir=out)
        print(json.dumps({"metric": metric, "value": round(value, 4), "baseline": baseline,
                          "baseline_value": baseline_value}), flush=True)

    started = time.perf_counter()
    model = random_llama(w.shape, dev, dtype)
    tokenizer = word_tokenizer(w.vocab)
    if dev != "cuda" and phases & {"check", "profile", "quant"}:
        print("needs a GPU, skipped on the CPU: the Triton kernel check, profile, quant", flush=True)
    if "check" in phases and dev == "cuda":
        for name, err in check_kernels().items():
            put(f"kernel_rel_err_{name}", err, "relative L2 error vs PyTorch ops")
    t0 = time.perf_counter()
    engine = Engine(model, tokenizer, ServingConfig(scheduler=_batch(w.concurrent), max_new_tokens=w.new))
    put("engine_start_s", time.perf_counter() - t0, "s (KV cache, graph capture)")
    one = random_prompts(1, w.prompt, w.vocab)
    many = random_prompts(w.concurrent, w.prompt, w.vocab, seed=2)
    ours = engine_phases(engine, model, phases, put, one, many, w)
    if "profile" in phases and dev == "cuda":
        profile_decode(engine, out)
    engine.close()
    baseline_phases(model, phases - {"compile"}, put, one, many, ours, args.compile_box_s, w)
    variant_phases(model, tokenizer, phases - {"int8"}, put, one, many, ours, w)
    baseline_phases(model, phases & {"compile"}, put, one, many, ours, args.compile_box_s, w)
    if "quant" in phases and dev == "cuda":
        from bench.serve.quant import phase as quant_phase

        del engine
        quant_phase(put, one, many, w.new, args.train_s)
    variant_phases(model, tokenizer, phases & {"int8"}, put, one, many, ours, w)
    print(f"total {time.perf_counter() - started:.0f} s; records in {out}")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    run(main)
