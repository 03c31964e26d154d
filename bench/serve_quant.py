"""The ``quant`` phase of the GPU serving benchmark: speed and quality of each quantization option.

    python bench/serve_gpu.py --phases quant [--results DIR]      # the phase, beside the others
    python bench/serve_quant.py [--sweep] [--options int4,...] [--train-s S] [--results DIR]  # alone

Speed: for weights none / int8 / int4 / fp8 and KV cache bf16 / fp8, one-stream and 64-concurrent
output tokens/s of the engine on the Llama-shaped 1.1B (random bf16 weights: speed does not depend
on the values), baseline bf16 weights and cache in the same job; weight memory and KV blocks at a
fixed cache budget too.

Quality: random weights say nothing about rounding damage, so a small Llama (~24M parameters,
byte-level, vocabulary 256) is trained here for a time box on real text that every device has:
the Python standard library's own source files, split by file into training and held-out parts
(one file in ten held out). The held-out perplexity per byte is then computed through the engine's
runner (``PagedBackend.prefill`` with every token's logits) for each option, against bf16 weights
and cache, and the model's own ``transformers`` forward as a check that the runner is exact.

``--sweep`` times the quantized matmuls alone (int8 Triton block shapes, int4 tinygemm, fp8
``_scaled_mm``) against bf16 ``F.linear`` on the 1.1B's layer shapes. Needs torch, transformers,
triton and pydantic only.
"""

from __future__ import annotations

import copy
import gc
import math
import sysconfig
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.config.serving import ServingConfig
from lmforge.serving.backend import PrefillItem
from lmforge.serving.engine import Engine
from lmforge.serving.paged import PagedBackend
from lmforge.serving.quantize import quantize_model

Put = Callable[..., None]
OPTIONS = [("none", "auto"), ("int8", "auto"), ("int4", "auto"), ("fp8", "auto"), ("none", "fp8"), ("fp8", "fp8")]
SMALL = dict(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0)
SEQ = 512


def label(weights: str, kv: str) -> str:
    return f"w_{weights}_kv_{'bf16' if kv == 'auto' else kv}"


# ---------------------------------------------------------------- speed on the 1.1B


def speed(put: Put, shape: dict, tokenizer, one, many, new: int) -> None:
    base: dict[str, float] = {}
    for weights, kv in OPTIONS:
        try:
            speed_one(put, shape, tokenizer, one, many, new, weights, kv, base)
        except Exception:  # noqa: BLE001 - the other options still get measured
            print(f"speed {weights}/{kv} failed:\n{traceback.format_exc()}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()


def speed_one(put: Put, shape: dict, tokenizer, one, many, new: int, weights: str, kv: str,
              base: dict[str, float]) -> None:
    from serve_common import engine_tokens_per_s, random_llama

    model = random_llama(shape, "cuda", torch.bfloat16)
    quantize_model(model, weights)
    torch.cuda.synchronize()
    weight_mb = torch.cuda.memory_allocated() / 2**20
    cfg = ServingConfig(max_batch_size=len(many), max_queue=4096, max_new_tokens=new, kv_cache_dtype=kv,
                        kv_cache_mb=4096)
    engine = Engine(model, tokenizer, cfg)
    try:
        name = label(weights, kv)
        put(f"quant_{name}_weights_mib", weight_mb, "MiB on the GPU before the KV cache")
        put(f"quant_{name}_kv_blocks_4gib", engine.backend.cache.num_blocks, "KV blocks of 16 tokens in 4 GiB")
        for n, prompts in (("1", one), ("64", many)):
            rate = engine_tokens_per_s(engine, prompts, new, repeats=3 if n == "1" else 2)
            base.setdefault(n, rate)
            put(f"quant_{name}_{n}_tok_s", rate, "output tok/s", "bf16 weights and KV cache (same job)", base[n])
    finally:
        engine.close()


# ---------------------------------------------------------------- quality on a trained model


def stdlib_bytes() -> tuple[bytes, bytes]:
    """(training, held-out) text: the standard library's .py files, one file in ten held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (held if zlib.crc32(str(path.relative_to(root)).encode()) % 10 == 0 else train).append(data)
    return b"\n".join(train), b"\n".join(held)


def train_small(text: bytes, seconds: float, put: Put):
    """A byte-level Llama trained on ``text`` for ``seconds`` (bf16 autocast, AdamW, cosine schedule)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).cuda().train()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).cuda().long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    batch, steps_max, warm = 64, 4000, 100
    gen = torch.Generator(device="cuda").manual_seed(0)
    start, step, loss = time.perf_counter(), 0, torch.tensor(0.0)
    while step < steps_max and time.perf_counter() - start < seconds:
        frac = (time.perf_counter() - start) / seconds  # cosine over the time box, not a step count
        lr = 1e-3 * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, data.numel() - SEQ - 1, (batch,), device="cuda", generator=gen)
        seqs = data[idx[:, None] + torch.arange(SEQ + 1, device="cuda")]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(seqs[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, 256), seqs[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    took = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    put("quant_ppl_model_params_m", params / 1e6, "million parameters (byte-level Llama)")
    put("quant_ppl_train_steps", step, f"steps of {batch}x{SEQ} bytes in {took:.0f} s")
    put("quant_ppl_train_loss", float(loss), "nats per byte, last step")
    return model.eval().to(torch.bfloat16)


def held_out_windows(text: bytes, n: int) -> list[list[int]]:
    stride = max(SEQ, (len(text) - SEQ) // n)
    return [list(text[i:i + SEQ]) for i in range(0, len(text) - SEQ, stride)][:n]


@torch.inference_mode()
def engine_ppl(model, weights: str, kv: str, windows: list[list[int]]) -> float:
    """Per-byte perplexity of ``windows`` through the paged runner with these options."""
    model = copy.deepcopy(model)
    quantize_model(model, weights)
    cfg = ServingConfig(max_batch_size=8, cuda_graphs=False, kv_cache_dtype=kv, kv_cache_mb=512)
    backend = PagedBackend(model, cfg, SMALL["max_position_embeddings"])
    nll, count = 0.0, 0
    for first in range(0, len(windows), 8):
        chunk = windows[first:first + 8]
        rows = [backend.reserve(SEQ) for _ in chunk]
        logits = backend.prefill([PrefillItem(r, 0, w, all_logits=True) for r, w in zip(rows, chunk)])
        for lg, w in zip(logits, chunk):
            target = torch.tensor(w[1:], device=lg.device)
            nll += float(F.cross_entropy(lg[:-1].float(), target, reduction="sum"))
            count += len(w) - 1
        for r in rows:
            backend.release(r)
    return math.exp(nll / count)


@torch.inference_mode()
def hf_ppl(model, windows: list[list[int]]) -> float:
    ids = torch.tensor(windows, device=model.device)
    nll = 0.0
    for first in range(0, len(windows), 16):
        part = ids[first:first + 16]
        logits = model(part).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, 256), part[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(nll / (ids.shape[0] * (SEQ - 1)))


def quality(put: Put, train_s: float) -> None:
    train, held = stdlib_bytes()
    put("quant_ppl_corpus_train_mb", len(train) / 1e6, "MB of stdlib .py source (training part)")
    put("quant_ppl_corpus_heldout_mb", len(held) / 1e6, "MB of stdlib .py source (held-out files)")
    model = train_small(train, train_s, put)
    windows = held_out_windows(held, 256)
    reference = hf_ppl(model, windows)
    put("quant_ppl_transformers_bf16", reference, f"held-out perplexity per byte ({len(windows)}x{SEQ} bytes)")
    base = None
    for weights, kv in OPTIONS:
        try:
            ppl = engine_ppl(model, weights, kv, windows)
        except Exception:  # noqa: BLE001 - the other options still get measured
            print(f"perplexity {weights}/{kv} failed:\n{traceback.format_exc()}", flush=True)
            continue
        base = base or ppl
        put(f"quant_{label(weights, kv)}_heldout_ppl", ppl, "held-out perplexity per byte (lower is better)",
            "bf16 weights and KV cache through the engine (same job)", base, higher_is_better=False)


# ---------------------------------------------------------------- correctness on the device


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@torch.inference_mode()
def check(put: Put) -> None:
    """Quantized layers against their dequantized weights, fused against unfused; fp8 KV kernels vs PyTorch."""
    from lmforge.serving.model_runner import FusedLinear
    from lmforge.serving.ops import Ops, StepLayout, TritonOps
    from lmforge.serving.quantize import Fp8Linear, Int4Linear, Int8Linear

    from lmforge.serving.int4_layout import tinygemm_layout

    put("quant_check_int4_layout_learned", float(tinygemm_layout("cuda:0") is not None), "1: widening path usable")
    for cls, rows in ((Int8Linear, 37), (Int8Linear, 160), (Int4Linear, 9), (Int4Linear, 160), (Fp8Linear, 37),
                      (Fp8Linear, 160)):
        # 160 rows: fp8's _scaled_mm path and int4's widening path; 9 rows: tinygemm
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        parts = [torch.nn.Linear(1024, n, bias=False, device="cuda", dtype=torch.bfloat16) for n in (512, 128, 256)]
        exact = torch.cat([F.linear(x, p.weight) for p in parts], dim=-1)
        mods = [cls.from_linear(p) for p in parts]
        alone = torch.cat([m(x) for m in mods], dim=-1)
        fused = FusedLinear(mods)(x)
        after = torch.cat([m(x) for m in mods], dim=-1)  # the parts now view the fused storage
        put(f"quant_check_{cls.__name__}_m{rows}_rel_err", _rel(alone, exact), "relative L2 error vs bf16 weights")
        put(f"quant_check_{cls.__name__}_m{rows}_fused_rel_err", max(_rel(fused, alone), _rel(after, alone)),
            "relative L2 error, fused vs per-layer")
    heads, kvh, hd, bs = 32, 4, 64, 16
    table = torch.randperm(200, device="cuda")[:7 * 20].reshape(7, 20).int()
    cos, sin = (torch.randn(400, hd // 2, device="cuda", dtype=torch.bfloat16).repeat(1, 2) for _ in range(2))
    for name, items, tpb in [("prefill", [(0, 0, list(range(200))), (3, 17, list(range(45)))], 16),
                             ("decode", [(i, 13 + 41 * i, [5]) for i in range(6)], 1)]:
        layout = StepLayout.build(items, torch.device("cuda"), tpb, None)
        qkv = torch.randn(layout.tokens.shape[0], (heads + 2 * kvh) * hd, device="cuda", dtype=torch.bfloat16)
        slots = table[layout.rows, layout.positions // bs].long() * bs + layout.positions % bs
        outs = []
        for ops, dtype in ((Ops(), torch.bfloat16), (Ops(), torch.float8_e4m3fn), (TritonOps(), torch.float8_e4m3fn)):
            kc = torch.zeros(200 * bs, kvh, hd, device="cuda", dtype=dtype)
            vc = torch.zeros_like(kc)
            q = ops.rope_store(qkv, cos, sin, layout.positions, slots, kc, vc, heads, kvh, hd)
            outs.append(ops.attention(q, kc, vc, table, layout, bs, hd**-0.5))
        put(f"quant_check_fp8_kv_triton_vs_torch_{name}", _rel(outs[2], outs[1]), "relative L2 error, same fp8 cache")
        put(f"quant_check_fp8_kv_vs_bf16_{name}", _rel(outs[2], outs[0]), "relative L2 error of attention output")


# ---------------------------------------------------------------- kernel sweep


def _timed(fns: list[Callable[[], torch.Tensor]]) -> float:
    """Median microseconds per call, cycling through ``fns`` (distinct weights: L2 does not hold them all)."""
    import triton.testing

    state = {"i": 0}

    def call():
        state["i"] += 1
        return fns[state["i"] % len(fns)]()

    return triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median") * 1e3


def sweep(put: Put) -> None:
    from lmforge.serving.quant_kernels import weight_only_mm
    from lmforge.serving.quantize import Fp8Linear, Int4Linear, Int8Linear

    shapes = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
    small = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st)
             for bn in (16, 32, 64) for bk in (128, 256) for st in (3, 4)]
    mid = [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4)
           for bn in (16, 32, 64) for bk in (64, 128)]
    big = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
           dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)]
    for m, configs in ((1, small), (64, mid), (2048, big)):
        for name, (n, k) in shapes.items():
            copies = max(4, math.ceil(240e6 / (n * k * 2)))  # int4 copies too must outgrow the 50 MB L2
            linears = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = _timed([lambda lin=lin: F.linear(x, lin.weight) for lin in linears])
            q8 = [Int8Linear.from_linear(lin) for lin in linears]
            ref = F.linear(x, linears[0].weight)
            best = None
            for cfg in configs:
                us = _timed([lambda q=q: weight_only_mm(x, q.qweight, q.scale, config=cfg) for q in q8])
                best = min(best or (us, cfg), (us, cfg), key=lambda t: t[0])
            got = weight_only_mm(x, q8[0].qweight, q8[0].scale, config=best[1])
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            others = {}
            for cls in (Int4Linear, Fp8Linear):
                mods = [cls.from_linear(lin) for lin in linears]
                others[cls.__name__] = _timed([lambda q=q: q(x) for q in mods])
            print(f"M={m} {name} {n}x{k}: bf16 {bf16:.1f} us; int8 {best[0]:.1f} us {best[1]} err {err:.4f}; "
                  f"int4 {others['Int4Linear']:.1f} us; fp8 {others['Fp8Linear']:.1f} us", flush=True)
            for key, us in (("bf16", bf16), ("int8", best[0]), ("int4", others["Int4Linear"]),
                            ("fp8", others["Fp8Linear"])):
                put(f"kernel_{key}_m{m}_{name}_us", us, f"us per matmul [{m}x{k}]x[{k}x{n}] (median)",
                    "bf16 F.linear (same job)", bf16, higher_is_better=False)


def run(put: Put, one, many, new: int, train_s: float = 60.0, kernels: bool = False,
        options: list[str] | None = None) -> None:
    """All sections; ``options`` (e.g. ``["int4"]``) limits speed and quality to those weights (plus bf16)."""
    from serve_common import LLAMA_1B, word_tokenizer

    if options:
        OPTIONS[:] = [o for o in OPTIONS if o == ("none", "auto") or (o[0] in options and o[1] == "auto")]

    sections = [("check", check, (put,)), ("quality", quality, (put, train_s)),
                ("speed", speed, (put, LLAMA_1B, word_tokenizer(LLAMA_1B["vocab_size"]), one, many, new))]
    for name, fn, args in sections + ([("sweep", sweep, (put,))] if kernels else []):
        try:  # one section's failure must not cost the others' figures (device time is scarce)
            fn(*args)
        except Exception:  # noqa: BLE001 - reported, and the next section still runs
            print(f"quant section {name} failed:\n{traceback.format_exc()}", flush=True)


def main() -> None:
    import argparse
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _record import record
    from serve_common import LLAMA_1B, random_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--train-s", type=float, default=60.0)
    parser.add_argument("--options", default="", help="comma-separated weight options to measure (default all)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0)
    shown = [a for a in sys.argv[1:] if not a.startswith("--results")]
    if args.results is not None and str(args.results) in shown:  # where figures go is not part of the command
        shown.remove(str(args.results))
    command = " ".join(["python bench/serve_quant.py", *shown])

    def put(metric, value, unit, baseline="", baseline_value=None, higher_is_better=True):
        record("serve_gpu", metric, value, unit, baseline, baseline_value, device=device, command=command,
               higher_is_better=higher_is_better, out_dir=args.results)
        print(json.dumps({"metric": metric, "value": round(float(value), 4), "baseline_value": baseline_value}),
              flush=True)

    one = random_prompts(1, 256, LLAMA_1B["vocab_size"])
    many = random_prompts(64, 256, LLAMA_1B["vocab_size"], seed=2)
    run(put, one, many, 256, args.train_s, args.sweep, [o for o in args.options.split(",") if o])


if __name__ == "__main__":
    main()
