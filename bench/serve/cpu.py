"""CPU serving benchmark: the demo model's output tokens/s in our engine against transformers
``generate()`` on the same machine, the speed and held-out perplexity of int8 weights, and the same
runs through ONNX Runtime (the model exported by ``lmforge.serving.export`` to a temporary directory).

    python -m bench.serve.cpu [--model DIR] [--heldout PARQUET] [--no-onnx] [--out DIR]
    python -m bench.serve.cpu --tiny      # a random 2-layer model and generated held-out text: a check

``--model`` defaults to the newest trained model of the workspace (``LMFORGE_HOME``, else
``./.lmforge``; ``make run`` makes one) and ``--heldout`` to that workspace's curated validation
split. Prompts are the first 64 tokens of held-out documents; each request generates 128 tokens
(EOS ignored, so every run does the same work); one stream, then 8 concurrent. ``--tiny`` writes
a random tiny Llama with a word-level tokenizer and held-out documents of random words to a
temporary directory and serves them with prompts of 16 tokens, 8 new tokens, 4 concurrent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.common.serve import (
    LLAMA_TINY,
    engine_tokens_per_s,
    generate_tokens_per_s,
    save_tiny_model,
)
from lmforge.config.serving import RuntimeConfig, SchedulerConfig, ServingConfig
from lmforge.core.errors import DataError
from lmforge.data.documents import read_texts
from lmforge.data.packing import pack_documents
from lmforge.evaluation.scoring import heldout_loss
from lmforge.serving.engine import Engine

PROMPT, NEW, CONCURRENT = 64, 128, 8
TINY_SIZES = (16, 8, 4)  # prompt tokens, new tokens, concurrent requests


def tiny_inputs(root: Path) -> tuple[Path, Path]:
    """A random tiny Llama with a word-level tokenizer, and held-out documents of its words."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model_dir = save_tiny_model(root / "model")
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{i}" for i in torch.randint(3, LLAMA_TINY["vocab_size"], (80,), generator=gen).tolist())
             for _ in range(16)]
    pq.write_table(pa.table({"text": texts}), root / "validation.parquet")
    return model_dir, root / "validation.parquet"


def _defaults(args: argparse.Namespace) -> tuple[Path, Path]:
    home = Path(os.environ.get("LMFORGE_HOME", ".lmforge"))
    model = args.model
    if model is None:
        runs = sorted(home.glob("runs/*/model/config.json"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise DataError(f"no trained model under {home}/runs", "run `make run` first, or pass --model DIR")
        model = runs[-1].parent
    return Path(model), Path(args.heldout or home / "data" / "curated" / "validation.parquet")


def perplexity(model, tokenizer, texts: list[str]) -> float:
    blocks = pack_documents(texts, tokenizer, 128, allow_short=True, max_blocks=32)["input_ids"]
    with torch.inference_mode():
        loss, _ = heldout_loss(model, blocks, 8)
    return math.exp(loss)


def onnx_speeds(model_dir: Path, prompts: list[list[int]], new: int) -> dict[str, float] | None:
    """The same runs through the ONNX Runtime backend, on an export made here (None without onnxruntime)."""
    try:
        import onnxruntime  # noqa: F401 - imported only to check that it is installed

        from lmforge.serving.export import export_onnx
    except ImportError:
        print("onnxruntime is not installed: no ONNX rows (pip install -e '.[onnx]')")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model_dir, Path(tmp))
        cfg = ServingConfig(runtime=RuntimeConfig(device="cpu"),
                            scheduler=SchedulerConfig(max_batch_size=len(prompts), max_queue=1024))
        engine = Engine.load(Path(tmp), cfg=cfg)
        try:
            return {"1": engine_tokens_per_s(engine, prompts[:1], new),
                    str(len(prompts)): engine_tokens_per_s(engine, prompts, new)}
        finally:
            engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--heldout", type=Path, default=None)
    parser.add_argument("--no-onnx", action="store_true", help="no ONNX Runtime rows (the export takes a while)")
    add_common_arguments(parser, "a random tiny model and generated held-out text: a check of this script")
    args = parser.parse_args()
    out = out_dir(args)
    with tempfile.TemporaryDirectory(prefix="bench-serve-cpu-") as tmp:
        if args.tiny:
            args.model, args.heldout = tiny_inputs(Path(tmp))
        measure(args, out, *(TINY_SIZES if args.tiny else (PROMPT, NEW, CONCURRENT)))


def measure(args: argparse.Namespace, out: Path, prompt_len: int, new: int, concurrent: int) -> None:
    model_dir, heldout = _defaults(args)
    texts = read_texts(heldout)
    if not texts:
        raise DataError(f"{heldout} holds no documents, so perplexity cannot be measured", "pass a larger --heldout")
    command = "python -m bench.serve.cpu" + (" --tiny" if args.tiny else f" --model {args.model}" if args.model else "")
    command += " --no-onnx" if args.no_onnx else ""
    figures: dict[str, float] = {}

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None,
            higher_is_better: bool = True) -> None:
        figures[metric] = value
        record("serve_cpu", metric, value, unit, baseline, baseline_value, command=command, out_dir=out,
               higher_is_better=higher_is_better)
        print(json.dumps({"metric": metric, "value": round(value, 3), "baseline_value": baseline_value}), flush=True)

    torch.manual_seed(0)
    speeds: dict[str, dict[str, float]] = {}
    many = str(concurrent)
    for quant in ("none", "int8"):
        cfg = ServingConfig(runtime=RuntimeConfig(device="cpu", quantization=quant),
                            scheduler=SchedulerConfig(max_batch_size=concurrent, max_queue=1024))
        engine = Engine.load(model_dir, cfg=cfg)
        prompts = [ids[:prompt_len] for ids in (engine.encode(t) for t in texts) if len(ids) >= prompt_len][:concurrent]
        if len(prompts) < concurrent:
            raise DataError(f"fewer than {concurrent} held-out documents of {prompt_len} tokens",
                            "pass a larger --heldout")
        speeds[quant] = {"1": engine_tokens_per_s(engine, prompts[:1], new),
                         many: engine_tokens_per_s(engine, prompts, new)}
        engine.close()
        figures[f"ppl_{quant}"] = perplexity(engine.model, engine.tokenizer, texts)
        if quant == "none":
            for n, batch in (("1", prompts[:1]), (many, prompts)):
                base = generate_tokens_per_s(engine.model, batch, new, repeats=3)  # min_new_tokens: no early EOS
                put(f"engine_{n}_stream_tok_s", speeds[quant][n], "output tok/s", "transformers generate() (same run)",
                    base)
    for n in ("1", many):
        put(f"engine_int8_{n}_stream_tok_s", speeds["int8"][n], "output tok/s",
            "our engine, float32 weights (same run)", speeds["none"][n])
    onnx = None if args.no_onnx else onnx_speeds(model_dir, prompts, new)
    for n in (("1", many) if onnx else ()):
        put(f"engine_onnx_{n}_stream_tok_s", onnx[n], "output tok/s", "our engine, PyTorch float32 (same run)",
            speeds["none"][n])
    put("heldout_perplexity_int8", figures["ppl_int8"], "perplexity", "float32 weights (same run)",
        figures["ppl_none"], higher_is_better=False)
    print(f"model {model_dir}; perplexity fp32 {figures['ppl_none']:.3f}, int8 {figures['ppl_int8']:.3f}; "
          f"records in {out}")


if __name__ == "__main__":
    started = time.perf_counter()
    try:
        run(main)
    finally:
        print(f"total {time.perf_counter() - started:.0f} s")
