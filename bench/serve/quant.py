"""The ``quant`` phase of the GPU serving benchmark: speed and quality of each quantization option.

    PYTHONPATH=src python -m bench.serve.gpu --phases quant [--out DIR]     # the phase, beside the others
    PYTHONPATH=src python -m bench.serve.quant [--sweep] [--options int4 ...] [--train-s S] [--out DIR]  # alone

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
triton and pydantic only. ``--tiny`` runs speed and quality on the CPU with tiny models, a few
seconds of training and the options a CPU has (none, int8, fp8 KV cache); the check section (Triton,
int4/fp8 matmuls) and ``--sweep`` need a GPU and are skipped there.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sysconfig
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.common.record import command_line, record
from bench.common.serve import (
    LLAMA_1B,
    LLAMA_TINY,
    engine_tokens_per_s,
    random_llama,
    random_prompts,
    word_tokenizer,
)
from bench.common.train import train_timed
from lmforge.config.serving import KVCacheConfig, RuntimeConfig, SchedulerConfig, ServingConfig
from lmforge.serving.backends.base import PrefillItem
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.engine import Engine
from lmforge.serving.quant.quantize import quantize_model

Put = Callable[..., None]
OPTIONS = [("none", "auto"), ("int8", "auto"), ("int4", "auto"), ("fp8", "auto"), ("none", "fp8"), ("fp8", "fp8")]
CPU_OPTIONS = [("none", "auto"), ("int8", "auto"), ("none", "fp8")]  # int4 and fp8 weights need CUDA
WEIGHTS = ("int8", "int4", "fp8")
SMALL = dict(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0)


@dataclass(frozen=True)
class Scale:
    """The sizes of a run: the device, the byte-level model of the quality section and its data
    (sequence, batch, held-out windows, stdlib files; None: all), the speed section's cache budget."""

    device: str
    small: dict
    seq: int
    batch: int
    windows: int
    files: int | None
    kv_cache_mb: int


FULL = Scale("cuda", SMALL, seq=512, batch=64, windows=256, files=None, kv_cache_mb=4096)
TINY = Scale("cpu", dict(SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128),
             seq=64, batch=8, windows=8, files=40, kv_cache_mb=64)


def label(weights: str, kv: str) -> str:
    return f"w_{weights}_kv_{'bf16' if kv == 'auto' else kv}"


# ---------------------------------------------------------------- speed on the 1.1B


def speed(put: Put, shape: dict, tokenizer, one, many, new: int, options: list, sc: Scale) -> None:
    base: dict[str, float] = {}
    for weights, kv in options:
        try:
            speed_one(put, shape, tokenizer, one, many, new, weights, kv, base, sc)
        except Exception:  # noqa: BLE001 - the other options still get measured
            print(f"speed {weights}/{kv} failed:\n{traceback.format_exc()}", flush=True)
        gc.collect()
        if sc.device == "cuda":
            torch.cuda.empty_cache()


def speed_one(put: Put, shape: dict, tokenizer, one, many, new: int, weights: str, kv: str,
              base: dict[str, float], sc: Scale) -> None:
    cuda = sc.device == "cuda"
    model = random_llama(shape, sc.device, torch.bfloat16 if cuda else torch.float32)
    quantize_model(model, weights)
    if cuda:
        torch.cuda.synchronize()
        weight_mb = torch.cuda.memory_allocated() / 2**20
    else:  # no allocator figure on the CPU: the weights' own bytes
        weight_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    cfg = ServingConfig(scheduler=SchedulerConfig(max_batch_size=len(many), max_queue=4096), max_new_tokens=new,
                        kv_cache=KVCacheConfig(dtype=kv, memory_mb=sc.kv_cache_mb))
    engine = Engine(model, tokenizer, cfg)
    budget = "4gib" if sc.kv_cache_mb == 4096 else f"{sc.kv_cache_mb}mib"
    try:
        name = label(weights, kv)
        put(f"quant_{name}_weights_mib", weight_mb, f"MiB on the {'GPU' if cuda else 'CPU'} before the KV cache")
        put(f"quant_{name}_kv_blocks_{budget}", engine.backend.cache.num_blocks,
            f"KV blocks of 16 tokens in {sc.kv_cache_mb} MiB")
        for n, prompts in (("1", one), (str(len(many)), many)):
            rate = engine_tokens_per_s(engine, prompts, new, repeats=3 if n == "1" else 2)
            base.setdefault(n, rate)
            put(f"quant_{name}_{n}_tok_s", rate, "output tok/s", "bf16 weights and KV cache (same job)", base[n])
    finally:
        engine.close()


# ---------------------------------------------------------------- quality on a trained model


def stdlib_bytes(files: int | None = None) -> tuple[bytes, bytes]:
    """(training, held-out) text: the standard library's .py files (the first ``files`` of them),
    one file in ten held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py"))[:files]:
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (held if zlib.crc32(str(path.relative_to(root)).encode()) % 10 == 0 else train).append(data)
    return b"\n".join(train), b"\n".join(held)


def train_small(text: bytes, seconds: float, put: Put, sc: Scale):
    """A byte-level Llama trained on ``text`` for ``seconds`` (bf16 autocast on CUDA, AdamW, cosine schedule)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev, seq, cuda = sc.device, sc.seq, sc.device == "cuda"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**sc.small)).to(dev).train()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(dev).long()
    gen = torch.Generator(device=dev).manual_seed(0)

    def loss_of() -> torch.Tensor:
        idx = torch.randint(0, data.numel() - seq - 1, (sc.batch,), device=dev, generator=gen)
        seqs = data[idx[:, None] + torch.arange(seq + 1, device=dev)]
        logits = model(seqs[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, 256), seqs[:, 1:].reshape(-1))

    step, took, loss = train_timed(model, loss_of, lr=1e-3, warm=100, seconds=seconds, cuda=cuda, weight_decay=0.1,
                                   max_steps=4000)
    params = sum(p.numel() for p in model.parameters())
    put("quant_ppl_model_params_m", params / 1e6, "million parameters (byte-level Llama)")
    put("quant_ppl_train_steps", step, f"steps of {sc.batch}x{seq} bytes in {took:.0f} s")
    put("quant_ppl_train_loss", loss, "nats per byte, last step")
    return model.eval().to(torch.bfloat16 if cuda else torch.float32)  # the serving dtype


def held_out_windows(text: bytes, n: int, seq: int) -> list[list[int]]:
    stride = max(seq, (len(text) - seq) // n)
    return [list(text[i:i + seq]) for i in range(0, len(text) - seq, stride)][:n]


@torch.inference_mode()
def engine_ppl(model, weights: str, kv: str, windows: list[list[int]]) -> float:
    """Per-byte perplexity of ``windows`` through the paged runner with these options."""
    model = copy.deepcopy(model)
    quantize_model(model, weights)
    cfg = ServingConfig(scheduler=SchedulerConfig(max_batch_size=8), runtime=RuntimeConfig(cuda_graphs=False),
                        kv_cache=KVCacheConfig(dtype=kv, memory_mb=512))
    backend = PagedBackend(model, cfg, model.config.max_position_embeddings)
    nll, count = 0.0, 0
    for first in range(0, len(windows), 8):
        chunk = windows[first:first + 8]
        rows = [backend.reserve(len(w)) for w in chunk]
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
    return math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1)))


def quality(put: Put, train_s: float, options: list, sc: Scale) -> None:
    train, held = stdlib_bytes(sc.files)
    put("quant_ppl_corpus_train_mb", len(train) / 1e6, "MB of stdlib .py source (training part)")
    put("quant_ppl_corpus_heldout_mb", len(held) / 1e6, "MB of stdlib .py source (held-out files)")
    model = train_small(train, train_s, put, sc)
    windows = held_out_windows(held, sc.windows, sc.seq)
    reference = hf_ppl(model, windows)
    put("quant_ppl_transformers_bf16", reference, f"held-out perplexity per byte ({len(windows)}x{sc.seq} bytes)")
    base = None
    for weights, kv in options:
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
    from lmforge.serving.model.ops import Ops, StepLayout, TritonOps
    from lmforge.serving.model.runner import FusedLinear
    from lmforge.serving.quant.int4_layout import tinygemm_layout
    from lmforge.serving.quant.quantize import Fp8Linear, Int4Linear, Int8Linear

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
    from lmforge.serving.kernels.quant import weight_only_mm
    from lmforge.serving.quant.quantize import Fp8Linear, Int4Linear, Int8Linear

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
            bf16 = _timed([lambda lin=lin, x=x: F.linear(x, lin.weight) for lin in linears])
            q8 = [Int8Linear.from_linear(lin) for lin in linears]
            ref = F.linear(x, linears[0].weight)
            best = None
            for cfg in configs:
                us = _timed([lambda q=q, x=x, cfg=cfg: weight_only_mm(x, q.qweight, q.scale, config=cfg) for q in q8])
                best = min(best or (us, cfg), (us, cfg), key=lambda t: t[0])
            got = weight_only_mm(x, q8[0].qweight, q8[0].scale, config=best[1])
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            others = {}
            for cls in (Int4Linear, Fp8Linear):
                mods = [cls.from_linear(lin) for lin in linears]
                others[cls.__name__] = _timed([lambda q=q, x=x: q(x) for q in mods])
            print(f"M={m} {name} {n}x{k}: bf16 {bf16:.1f} us; int8 {best[0]:.1f} us {best[1]} err {err:.4f}; "
                  f"int4 {others['Int4Linear']:.1f} us; fp8 {others['Fp8Linear']:.1f} us", flush=True)
            for key, us in (("bf16", bf16), ("int8", best[0]), ("int4", others["Int4Linear"]),
                            ("fp8", others["Fp8Linear"])):
                put(f"kernel_{key}_m{m}_{name}_us", us, f"us per matmul [{m}x{k}]x[{k}x{n}] (median)",
                    "bf16 F.linear (same job)", bf16, higher_is_better=False)


def phase(put: Put, one, many, new: int, train_s: float = 60.0, kernels: bool = False,
          options: list[str] | None = None, sc: Scale = FULL) -> None:
    """All sections; ``options`` (e.g. ``["int4"]``) limits speed and quality to those weights (plus bf16)."""
    chosen = OPTIONS if sc.device == "cuda" else CPU_OPTIONS
    if options:
        chosen = [o for o in chosen if o == ("none", "auto") or (o[0] in options and o[1] == "auto")]
    shape = LLAMA_1B if sc.device == "cuda" else LLAMA_TINY
    sections = [("quality", quality, (put, train_s, chosen, sc)),
                ("speed", speed, (put, shape, word_tokenizer(shape["vocab_size"]), one, many, new, chosen, sc))]
    if sc.device == "cuda":
        sections.insert(0, ("check", check, (put,)))
        sections += [("sweep", sweep, (put,))] if kernels else []
    else:
        print("needs a GPU, skipped on the CPU: the check section (Triton, int4/fp8 matmuls) and --sweep", flush=True)
    for name, fn, args in sections:
        try:  # one section's failure must not cost the others' figures (device time is scarce)
            fn(*args)
        except Exception:  # noqa: BLE001 - reported, and the next section still runs
            print(f"quant section {name} failed:\n{traceback.format_exc()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--train-s", type=float, default=None, help="training time box (default 60 s; 3 s with --tiny)")
    parser.add_argument("--options", nargs="+", default=[], metavar="WEIGHTS",
                        help=f"weight options to measure besides bf16 (default all): {' '.join(WEIGHTS)}")
    add_common_arguments(parser, "tiny models on the CPU, the options a CPU has: a check of this script")
    args = parser.parse_args()
    options = choose(args.options, WEIGHTS, "weight option", "--options")
    out, sc = out_dir(args), TINY if args.tiny else FULL
    device = torch.cuda.get_device_name(0) if sc.device == "cuda" else "cpu (--tiny check)"
    command = command_line("PYTHONPATH=src python")

    def put(metric, value, unit, baseline="", baseline_value=None, higher_is_better=True):
        record("serve_gpu", metric, value, unit, baseline, baseline_value, device=device, command=command,
               higher_is_better=higher_is_better, out_dir=out)
        print(json.dumps({"metric": metric, "value": round(float(value), 4), "baseline_value": baseline_value}),
              flush=True)

    shape, prompt, new, many_n = (LLAMA_TINY, 16, 8, 4) if args.tiny else (LLAMA_1B, 256, 256, 64)
    one = random_prompts(1, prompt, shape["vocab_size"])
    many = random_prompts(many_n, prompt, shape["vocab_size"], seed=2)
    phase(put, one, many, new, args.train_s or (3.0 if args.tiny else 60.0), args.sweep, options, sc)
    print(f"records in {out}")


if __name__ == "__main__":
    run(main)
