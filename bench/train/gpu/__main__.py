"""Training throughput on one GPU: plain transformers/peft loops against lmforge's engine, in one job.

    PYTHONPATH=src python -m bench.train.gpu [--only gpt2 llama_full llama_lora ablations] [--out DIR]
    PYTHONPATH=src python -m bench.train.gpu --only gpt2_baselines llama_fa4 llama_fp8 --gpt2 model,fa4,graphs
    python -m bench.train.gpu --tiny --only gpt2/plain gpt2/lmforge --gpt2-steps 2    # a CPU check of this script

(the second is the current best settings with their baselines; ``fa4`` needs the flash-attn-4 and
nvidia-cutlass-dsl packages, ``fp8`` torchao: ``pip install 'lmforge[gpu]'``). ``--only`` takes
group names and single rows by name (``--list`` shows both); ``--gpt2`` takes engine settings
(``bench.train.gpu.variants``: words such as ``model,fa4,graphs``, optionally ``+pageable``).

Needs only torch, transformers and peft (plus pydantic, which lmforge's configs use). Synthetic
random tokens, packed (no padding). Workloads, as in issue 5:

- GPT-2 124M pretraining, sequence 1024, batch 16;
- Llama-shaped 1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, vocabulary 32000, untied
  embeddings), sequence 2048, batch 8: full fine-tuning, and LoRA r=16 on all linear layers.

Baselines, measured in the same process: a plain loop (float32 weights, bf16 autocast, AdamW,
SDPA attention, the model's own loss, gradient clipping), the same with ``torch.compile(model)``,
and for LoRA the same plain loop over a peft model. Ours: :func:`lmforge.train.loop.train_phase`,
the engine's one loop, with its GPU settings (blocks compiled one by one, fused AdamW, the chunked
fused output-layer cross-entropy, embeddings padded to a multiple of 64, bf16 frozen base for LoRA).
Each optimization is also measured alone on top of the plain loop (``plain+X`` rows).

MFU = (6·N + 12·L·h·S) · tokens/s / 989e12: N all parameters (tied once), L layers, h hidden size,
S sequence length, 989 TFLOP/s the H100's dense bf16 peak. For LoRA the same 6·N convention is
kept (its backward skips weight gradients of the frozen base, so its true FLOPs are lower).
Raw rows go to OUT/train_gpu_raw.jsonl as each variant finishes, and figures with their baselines
to OUT/train_gpu.jsonl through ``bench.common.record``. Beside this module: ``variants`` (the rows as
typed records, the groups), ``runner`` (building and timing a row), ``records`` (the figures).
"""

from __future__ import annotations

import argparse

from bench.common.cli import add_common_arguments, out_dir, run
from bench.train.gpu.variants import (
    DEFAULT_ONLY,
    EngineSettings,
    Steps,
    gpt2_engine_row,
    groups,
    plan,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(DEFAULT_ONLY), metavar="GROUP_OR_ROW",
                        help="groups (or single rows by name) to measure; --list shows them")
    parser.add_argument("--list", action="store_true", help="print the groups and their rows, and exit")
    parser.add_argument("--budget-s", type=float, default=330, help="skip variants that would start after this")
    parser.add_argument("--gpt2", nargs="*", default=[], type=EngineSettings.parse, metavar="SETTINGS",
                        help="GPT-2 engine rows with these settings, e.g. model,fa4,graphs model,cudnn+pageable")
    parser.add_argument("--profile", type=EngineSettings.parse, metavar="SETTINGS",
                        help="profile the GPT-2 engine with these settings")
    parser.add_argument("--gpt2-steps", type=int, default=20, help="timed steps of every GPT-2 row")
    parser.add_argument("--llama-steps", type=int, default=8, help="timed steps of every Llama row")
    parser.add_argument("--gpt2-warmup", type=int, default=10,
                        help="warm-up steps of the --gpt2 engine rows, also their log (and synchronization) cadence")
    add_common_arguments(parser, "tiny shapes on the CPU, one warm-up step: a check of this script")
    args = parser.parse_args(argv)
    if args.gpt2_warmup < 1:
        parser.error("--gpt2-warmup must be at least 1 (the timed steps start after its log)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tiny = args.tiny
    steps = Steps(gpt2_warmup=1 if tiny else 4, gpt2_steps=args.gpt2_steps, llama_warmup=1 if tiny else 3,
                  gpt2_engine_warmup=1 if tiny else args.gpt2_warmup, llama_steps=args.llama_steps)
    if args.list:
        for name, rows in groups(steps).items():
            print(f"{name}: {' '.join(v.name for v in rows)}")
        return 0
    before, after = plan(args.only, args.gpt2, steps)
    # torch and lmforge only now: --list and option errors answer without them.
    from bench.train.gpu.records import write_records
    from bench.train.gpu.runner import Bench

    bench = Bench(out_dir(args), tiny=tiny, budget_s=args.budget_s)
    for variant in before:
        bench.run(variant)
    if args.profile:
        bench.profile(gpt2_engine_row(args.profile, steps))
    for variant in after:
        bench.run(variant)
    write_records(bench)
    print(f"records in {bench.out}")
    return 0


if __name__ == "__main__":
    run(main)
