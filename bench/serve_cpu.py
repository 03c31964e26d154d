"""CPU serving benchmark: the demo model's output tokens/s in our engine against transformers
``generate()`` on the same machine, the speed and held-out perplexity of int8 weights, and the same
runs through ONNX Runtime (the model exported by ``lmforge.serving.onnx_export`` to a temporary directory).

    python bench/serve_cpu.py [--model DIR] [--heldout PARQUET] [--results DIR]

``--model`` defaults to the newest trained model of the workspace (``LMFORGE_HOME``, else
``./.lmforge``; ``make run`` makes one) and ``--heldout`` to that workspace's curated validation
split. Prompts are the first 64 tokens of held-out documents; each request generates 128 tokens
(EOS ignored, so every run does the same work); one stream, then 8 concurrent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402
from serve_common import engine_tokens_per_s, generate_tokens_per_s  # noqa: E402

from lmforge.config.serving import ServingConfig  # noqa: E402
from lmforge.core.errors import DataError  # noqa: E402
from lmforge.stages.evaluate import heldout_loss, pack_blocks, read_heldout_texts  # noqa: E402
from lmforge.serving.engine import Engine  # noqa: E402

PROMPT, NEW, CONCURRENT = 64, 128, 8


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
    blocks = pack_blocks(texts, tokenizer, 128, 32)
    with torch.inference_mode():
        loss, _ = heldout_loss(model, blocks, 8)
    return math.exp(loss)


def onnx_speeds(model_dir: Path, prompts: list[list[int]]) -> dict[str, float] | None:
    """The same runs through the ONNX Runtime backend, on an export made here (None without onnxruntime)."""
    import tempfile

    try:
        from lmforge.serving.onnx_export import export_onnx

        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: no ONNX rows (pip install -e '.[onnx]')")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model_dir, Path(tmp))
        engine = Engine.load(Path(tmp), cfg=ServingConfig(device="cpu", max_batch_size=CONCURRENT, max_queue=1024))
        try:
            return {"1": engine_tokens_per_s(engine, prompts[:1], NEW),
                    str(CONCURRENT): engine_tokens_per_s(engine, prompts, NEW)}
        finally:
            engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--heldout", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    model_dir, heldout = _defaults(args)
    texts = read_heldout_texts(heldout)
    command = "python bench/serve_cpu.py" + (f" --model {args.model}" if args.model else "")
    figures: dict[str, float] = {}

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None,
            higher_is_better: bool = True) -> None:
        figures[metric] = value
        record("serve_cpu", metric, value, unit, baseline, baseline_value, command=command, out_dir=args.results,
               higher_is_better=higher_is_better)
        print(json.dumps({"metric": metric, "value": round(value, 3), "baseline_value": baseline_value}), flush=True)

    torch.manual_seed(0)
    speeds: dict[str, dict[str, float]] = {}
    for quant in ("none", "int8"):
        cfg = ServingConfig(device="cpu", max_batch_size=CONCURRENT, max_queue=1024, quantization=quant)
        engine = Engine.load(model_dir, cfg=cfg)
        prompts = [ids[:PROMPT] for ids in (engine.encode(t) for t in texts) if len(ids) >= PROMPT][:CONCURRENT]
        if len(prompts) < CONCURRENT:
            raise DataError(f"fewer than {CONCURRENT} held-out documents of {PROMPT} tokens", "pass a larger --heldout")
        speeds[quant] = {"1": engine_tokens_per_s(engine, prompts[:1], NEW),
                         str(CONCURRENT): engine_tokens_per_s(engine, prompts, NEW)}
        engine.close()
        figures[f"ppl_{quant}"] = perplexity(engine.model, engine.tokenizer, texts)
        if quant == "none":
            for n, batch in (("1", prompts[:1]), (str(CONCURRENT), prompts)):
                base = generate_tokens_per_s(engine.model, batch, NEW, repeats=3)  # min_new_tokens: no early EOS
                put(f"engine_{n}_stream_tok_s", speeds[quant][n], "output tok/s", "transformers generate() (same run)",
                    base)
    for n in ("1", str(CONCURRENT)):
        put(f"engine_int8_{n}_stream_tok_s", speeds["int8"][n], "output tok/s", "our engine, float32 weights (same run)",
            speeds["none"][n])
    onnx = onnx_speeds(model_dir, prompts)
    for n in (("1", str(CONCURRENT)) if onnx else ()):
        put(f"engine_onnx_{n}_stream_tok_s", onnx[n], "output tok/s", "our engine, PyTorch float32 (same run)",
            speeds["none"][n])
    put("heldout_perplexity_int8", figures["ppl_int8"], "perplexity", "float32 weights (same run)",
        figures["ppl_none"], higher_is_better=False)
    print(f"model {model_dir}; perplexity fp32 {figures['ppl_none']:.3f}, int8 {figures['ppl_int8']:.3f}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
