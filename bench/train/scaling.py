"""Training scaling: tokens/s per GPU, scaling efficiency and MFU of ddp and fsdp over 1 to 8 GPUs.

    PYTHONPATH=src python -m bench.train.scaling [--worlds 1 2 4 8] [--strategies ddp fsdp] [--shape 1b]
    python -m bench.train.scaling --tiny  # CPU: 1 and 2 gloo ranks of a tiny Llama, a check of this script

Every point is a real run of the training engine, launched as a user launches it without Ray:
``torchrun --nproc-per-node N -m lmforge.train CONFIG`` (``lmforge/train/torchrun.py``), full-weight
training (method ``pretrain``: every weight trained, as full fine-tuning) of the shape at sequence
length 2048, ``--batch`` sequences per GPU, on the text of this machine's Python standard library
with a tokenizer trained on it first. Strategies: ``ddp``, ``fsdp`` (FSDP2), and ``fsdp-tp2`` (FSDP2
over groups of two tensor-parallel ranks: the TP x FSDP mesh). ddp and fsdp compile the blocks
(``speed.compile``, ``compile_scope: blocks``) unless ``--eager``; tensor parallelism runs eagerly
(it refuses compile), so compare it with ``--eager`` runs of fsdp.

From rank 0's history the rate is taken between the first logged step at or after ``--warmup`` and
the last (compilation and the first validation excluded): global tokens/s, per GPU, the efficiency
against the same strategy on one GPU in the same job, and MFU against the H100's dense bf16 peak
(989 TFLOP/s; the H200's is the same), with 6N + 12·L·h·S FLOPs per token. Peak memory per GPU
comes from the run's parameters. Records go to ``OUT/train_scaling.jsonl`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.common.record import record
from lmforge.config.model import ModelConfig

SHAPES = {
    "1b": ModelConfig(architecture="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                      num_kv_heads=4, intermediate_size=5632, max_seq_len=2048, tie_embeddings=False),
    # Llama-3-8B's widths with 8 of its 32 layers: the TP x FSDP comparison in one job's time.
    "8b-8l": ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, num_layers=8, num_heads=32,
                         num_kv_heads=8, intermediate_size=14336, max_seq_len=2048, tie_embeddings=False),
    # All 32 layers: ~8B weights, 16 bytes each with AdamW's state, more than one 80 GB GPU holds (fsdp over 8).
    "8b": ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, intermediate_size=14336, max_seq_len=2048, tie_embeddings=False),
}
TINY = ModelConfig(architecture="llama", vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=128, max_seq_len=64, tie_embeddings=False)
STRATEGIES = {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"},
              "fsdp-tp2": {"strategy": "fsdp", "tensor_parallel": 2}}
PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (lmforge.model.info.H100_BF16_PEAK; an H200's is the same)


def config_text(model: ModelConfig, strategy: str, steps: int, batch: int, seq: int, gpu: bool, eager: bool) -> str:
    """The pipeline config of one run (JSON is YAML)."""
    compiled = not eager and "tensor_parallel" not in STRATEGIES[strategy]
    training = {
        "method": "pretrain",
        "pretrain": {"steps": steps, "learning_rate": 3e-4, "batch_size": batch, "seq_len": seq, "warmup_steps": 2},
        "logging": {"every": max(1, steps // 10)},
        "parallel": STRATEGIES[strategy],
        "placement": {"use_ray": False, "use_gpu": gpu},
        "speed": {"compile": compiled, "compile_scope": "blocks"},
    }
    return json.dumps({"model": model.model_dump(mode="json", exclude={"base_model"}), "training": training})


def steady_rate(history: list[dict], tokens_per_step: int, warmup: int) -> float:
    """Global tokens/s between the first logged step at or after ``warmup`` and the last. Each row's rate is
    its tokens so far over its time so far, so its time so far is tokens / rate."""
    rows = [r for r in history if r["phase"] == "pretrain"]
    after = [r for r in rows if r["step"] >= warmup]
    if len(after) < 2:
        raise RuntimeError(f"fewer than two logged steps from step {warmup} on: run more --steps")
    first, last = after[0], after[-1]
    elapsed = [r["step"] * tokens_per_step / r["tokens_per_s"] for r in (first, last)]
    return (last["step"] - first["step"]) * tokens_per_step / (elapsed[1] - elapsed[0])


def launch(config: Path, home: Path, world: int, log: Path, timeout_s: float) -> dict:
    """One run over ``world`` torchrun ranks; rank 0's facts (the last line it prints)."""
    env = dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "lmforge.train", str(config), "--run-name", config.stem]
    with log.open("w") as sink:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=sink, text=True, timeout=timeout_s)
    sink_tail = log.read_text()[-2000:]
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {sink_tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(home: Path, model: ModelConfig, megabytes: float) -> None:
    """The workspace: the standard library's text as curated data, and a tokenizer trained on it."""
    from bench.train.gpu_engine import write_corpus
    from lmforge.core.workspace import Workspace
    from lmforge.tokenizer.build import train_tokenizer

    ws = Workspace(home).ensure()
    write_corpus(ws, megabytes)
    train_tokenizer(model, ws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4, 8], help="GPUs per run")
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], metavar="STRATEGY",
                        help=" ".join(STRATEGIES))
    parser.add_argument("--shape", default="1b", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=30, help="steps of each run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate (compilation)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU and step")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (the tensor-parallel comparison)")
    parser.add_argument("--run-timeout-s", type=float, default=900, help="time box of each run")
    add_common_arguments(parser, "1 and 2 gloo ranks of a tiny Llama on the CPU: a check of this script")
    args = parser.parse_args()
    strategies = choose(args.strategies, STRATEGIES, "strategy", "--strategies")
    out = out_dir(args)
    import torch

    gpu = not args.tiny
    gpus = torch.cuda.device_count() if gpu else 2
    worlds = [1, 2] if args.tiny else sorted(set(args.worlds))
    model, name = (TINY, "tiny") if args.tiny else (SHAPES[args.shape], args.shape)
    seq, batch = (32, 4) if args.tiny else (2048, args.batch)
    steps, warmup = (6, 2) if args.tiny else (args.steps, args.warmup)
    eager = args.eager or args.tiny  # compiling on a CPU would take the tiny check's whole time
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpu else "cpu (--tiny check)"
    command = " ".join(["PYTHONPATH=src python -m bench.train.scaling", *(["--tiny"] if args.tiny else [
        "--worlds", *map(str, worlds), "--strategies", *strategies, "--shape", name, "--steps", str(steps),
        "--batch", str(batch), *(["--eager"] if args.eager else [])])])
    home = Path(tempfile.mkdtemp(prefix="lmforge-scaling-"))
    started = time.perf_counter()
    prepare(home, model, 0.2 if args.tiny else 6.0)
    print(f"workspace ready in {time.perf_counter() - started:.0f} s: {home}", flush=True)

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None) -> None:
        record("train_scaling", metric, value, unit, baseline, baseline_value, device=device, command=command,
               out_dir=out)
        print(json.dumps({"metric": metric, "value": round(value, 4), "baseline": baseline,
                          "baseline_value": baseline_value}), flush=True)

    for strategy in strategies:
        single: float | None = None
        for world in worlds:
            if world > gpus:
                print(f"{strategy}: {world} GPUs skipped, {gpus} visible", flush=True)
                continue
            if "tensor_parallel" in STRATEGIES[strategy] and world % 2:
                print(f"{strategy}: {world} ranks do not form groups of 2, skipped", flush=True)
                continue
            config = home / f"{strategy}-w{world}.yaml"
            config.write_text(config_text(model, strategy, steps, batch, seq, gpu, eager))
            begin = time.perf_counter()
            try:
                facts = launch(config, home, world, home / f"{config.stem}.log", args.run_timeout_s)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # one failed point must not cost the others
                print(f"{strategy} over {world}: failed: {str(exc)[-1500:]}", flush=True)
                continue
            history = json.loads((Path(facts["model_dir"]).parent / "train_result.json").read_text())["history"]
            params = facts["params"]
            copies = params["mesh"]["tensor_parallel"]  # a tensor-parallel group reads one batch
            rate = steady_rate(history, world // copies * batch * seq, warmup)
            per_gpu = rate / world
            prefix = f"{name}_{strategy}{'_eager' if eager and not args.tiny else ''}_w{world}"
            flops = 6.0 * params["params_total"] + 12.0 * model.num_layers * model.hidden_size * seq
            print(f"{strategy} over {world}: {per_gpu:.0f} tok/s per GPU, run {time.perf_counter() - begin:.0f} s",
                  flush=True)
            if world == 1:
                single = per_gpu
            if single is None or world == 1:
                put(f"{prefix}_tok_s_per_gpu", per_gpu, "tokens/s per GPU")
            else:
                put(f"{prefix}_tok_s_per_gpu", per_gpu, "tokens/s per GPU", f"{strategy} on 1 GPU", single)
            if single is not None and world > 1:
                put(f"{prefix}_scaling_efficiency", per_gpu / single, "per-GPU rate over 1 GPU's", "ideal", 1.0)
            if gpu:
                put(f"{prefix}_mfu", per_gpu * flops / PEAK, "model FLOPs utilization (H100 dense bf16 peak)")
                peak = params.get("peak_memory_per_worker_bytes")
                if peak:
                    put(f"{prefix}_peak_gib_per_gpu", peak / 2**30, "GiB, rank 0's peak allocated")


if __name__ == "__main__":
    run(main)
