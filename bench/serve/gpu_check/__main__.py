"""Device check of the serving engine's adapter and quantization paths against references.

    PYTHONPATH=src python -m bench.serve.gpu_check [--device cuda|cpu] [--only CHECK ...] [--out DIR]
    python -m bench.serve.gpu_check --tiny       # smaller model, fewer training steps, on the CPU

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
   ``fp8_kv`` (fp8 KV cache with the base and both adapters; CPU, or CUDA capability >= 8.9, else
   "skipped", never "pass") against the same engine on PyTorch ops, and against the unquantized
   engine (quality, sanity bound only); ``fp8_kv_prefix_refused``: loading an fp8 cache with the
   prefix adapter must fail with a ServingError naming ``serving.kv_cache.dtype: bf16`` (verdict
   "refused"; an engine that loads is the failure: its logits moved 11-32% on an H100);
4. ``graphs_vs_eager_*``: the requests of 1 and of the prefix adapter with ``cuda_graphs=False``;
5. ``prefix_cache_<lora|prefix|prompt>``: prompts sharing a 3-block "system prompt", sent twice to one
   engine: the second time every request must report ``cached_tokens > 0``, match an engine with
   prefix caching off (strict tolerance, every step), and match the reference forced on its tokens
   (base, LoRA a and b mixed in one batch; or a prefix / prompt-tuning adapter);
6. ``structured_graphs``: two bounded ``json_schema`` formats and free requests in one batch, CUDA
   graphs on and off: every constrained output finishes (stop), parses and validates (jsonschema),
   and the two runs agree (graphs_vs_eager's criterion);
7. ``speculative_ngram``: ``serving.speculative`` n-gram, k=4: logits (plain and verify steps) against
   the reference, and greedy tokens equal to plain decoding's (``base_alone``) except where they part
   at a near-tie: the float32 reference's gap between the two tokens at most TIE_FACTOR x the bf16
   reference's largest absolute logit error (TIE_ABS on the CPU); guesses must have been verified;
8. ``runtime_adapters``: both adapters loaded while serving (``serving.lora.max_loras`` 2) against the
   same adapters loaded at start-up (strict tolerance), again after unload and reload (fresh ids), and
   with one device slot (adapters swapped between requests; ordinary tolerances).

Verdicts, stable from run to run: models and adapters train from fixed seeds; each comparison takes
every step of every request (32 new tokens each); on CUDA the logits criterion is relative to the
bf16 reference's own noise: the engine's largest distance from float32 must be within 2x the bf16
reference model's + 0.01 (``NOISE_FACTOR``, ``NOISE_ABS``: a correct engine sits at 0.3-2x, a bug
at tens of percent); tokens may differ only where a near-tie lets them. ``verdict`` in each row is
"pass", "fail", "skipped" or "refused" (an expected refusal); only "fail" fails the run, and a run
with skipped checks does not print "all checks passed".

Every request is greedy with 32 new tokens (structured ones stop at their grammar's end). Requests
are queued together before the engine may admit any, so a run's schedule (which rows decode
together) is the same every time. The engine's logits of every step are read from its backend's
prefill and decode outputs. Two engines decoding freely diverge after a near-tie flip (their
histories then differ), so "greedy" comparisons check logits up to and including the first differing
token; "forced" ones check every step. Tolerances and why: ``TOLERANCES``. One JSON line per check
goes to stdout and to ``OUT/serve_gpu_check.jsonl`` (default: ``$OUT``, else the temporary
directory; ``--only a b`` runs some checks). Exit status 1 when a check fails. Needs torch,
transformers, peft, tokenizers, safetensors, pydantic, xgrammar, jsonschema (no pytest, ray or
mlflow). 44 s on an H100 before the checks of 5-8; about 3 minutes on 2 busy CPU cores, where every
comparison is float32. ``--tiny`` runs every check on the CPU with a smaller model (hidden 64, 2
layers) and fewer training steps, a check of this script in about a minute. Beside it: ``checks``
(the checks), ``models`` (tiny models, adapters, reference models), ``engine`` (running the engine
and keeping its logits), ``compare`` (comparisons, tolerances, the float32 noise floor used on
CUDA), ``paths`` (the checks of 5-8 and the fp8 refusal).
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

import torch

from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.serve.gpu_check.checks import Checks
from bench.serve.gpu_check.compare import EFFECT_FACTOR, TOLERANCES
from bench.serve.gpu_check.models import FULL, TINY, serving_dtype


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
    parser.add_argument("--device", default=None, help="default: cuda if present (cpu with --tiny)")
    parser.add_argument("--only", nargs="+", default=[], metavar="CHECK", help="check names (default: all)")
    add_common_arguments(parser, "a smaller model and fewer training steps on the CPU: a check of this script")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    wanted = set(choose(args.only, Checks.names(), "check", "--only"))
    log_path = out_dir(args, default=Path(os.environ.get("OUT") or tempfile.gettempdir())) / "serve_gpu_check.jsonl"
    env = environment(args.device)
    started = time.perf_counter()
    failed: list[str] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="serve-gpu-check-") as tmp, log_path.open("w") as log:
        checks = Checks(Path(tmp), args.device, TINY if args.tiny else FULL)

        def emit(record: dict) -> None:
            line = json.dumps(record)
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        emit({"check": "setup", **env, "tolerances": TOLERANCES, "effect_factor": EFFECT_FACTOR,
              "new_tokens": checks.scale.new, **checks.setup()["info"],
              "seconds": round(time.perf_counter() - started, 1)})
        for name, check in checks.all():
            if wanted and name not in wanted:
                continue
            t0 = time.perf_counter()
            try:
                record = check()
            except Exception as exc:  # noqa: BLE001 - one broken path must not hide the others' results
                record = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-2000:]}
            ok = bool(record.pop("ok"))
            # A skipped check is not a pass, and an expected refusal says so: the verdict names which.
            verdict = record.pop("verdict", "pass" if ok else "fail") if ok else "fail"
            emit({"check": name, "ok": ok, "verdict": verdict, "device": args.device, "dtype": env["dtype"], **record,
                  "seconds": round(time.perf_counter() - t0, 1)})
            failed += [] if ok else [name]
            skipped += [name] if verdict == "skipped" else []
    total = round(time.perf_counter() - started, 1)
    if failed:
        print(f"FAILED {len(failed)} check(s) on {env['device_name']}: {', '.join(failed)} "
              f"(details in {log_path}; {total} s)", file=sys.stderr)
        return 1
    if skipped:
        print(f"no check failed on {env['device_name']}, but {len(skipped)} were skipped: {', '.join(skipped)} "
              f"({total} s; results in {log_path})", file=sys.stderr)
        return 0
    print(f"all checks passed on {env['device_name']} in {total} s; results in {log_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
