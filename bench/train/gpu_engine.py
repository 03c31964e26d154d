"""The whole training engine on one GPU with its fastest settings: real runs, end to end.

    PYTHONPATH=src python -m bench.train.gpu_engine [--out DIR] [--steps 60] [--tiny]

``bench.train.gpu`` times the loop alone. This runs what ``python -m lmforge.train`` runs (tokenizer
training, packing, validation under CUDA graphs, checkpoints, the save and its probe) with
``compile_scope: model`` + ``attention_backend: fa4`` + ``cuda_graphs`` + ``residual_dtype:
bfloat16`` + ``compile_optimizer``, on a small GPT-2 and the text of this machine's Python standard library:

1. an uninterrupted run;
2. the same run stopped by an exception from its progress callback after a checkpoint, then
   resumed from that checkpoint: its loss curve against run 1's;
3. the same run with none of the speed settings (eager, SDPA, float32 residual): its losses
   against run 1's, the check that the fast path trains the same model;
4. run 1's saved model reloaded by transformers on the CPU in float32: its greedy tokens against
   the probe recorded at save time (on the GPU).

Needs torch, transformers, tokenizers, pyarrow and pydantic (and flash-attn-4 for fa4; ``--tiny``
runs the plain settings of a tiny GPT-2 on a CPU, 6 steps, as a check of this script). Writes
OUT/train_gpu_engine.json; the workspace is a new temporary directory unless ``--home`` names one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sysconfig
import tempfile
import time
from pathlib import Path

from bench.common.cli import add_common_arguments, out_dir, run
from lmforge.config.model import ModelConfig
from lmforge.config.training import (
    CheckpointingConfig,
    LoggingConfig,
    PhaseConfig,
    PlacementConfig,
    SpeedConfig,
    TrainingConfig,
    TrainValidationConfig,
)
from lmforge.core.workspace import Workspace

MODEL = ModelConfig(architecture="gpt2", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4,
                    num_kv_heads=4, intermediate_size=1024, max_seq_len=256, dropout=0.0, vocab_multiple=64)
TINY_MODEL = MODEL.model_copy(update=dict(vocab_size=512, hidden_size=64, num_layers=2, intermediate_size=128,
                                          max_seq_len=64))
BATCH = {"full": (32, 256), "tiny": (4, 64)}  # batch size, sequence length
FAST = SpeedConfig(compile=True, compile_scope="model", attention_backend="fa4", cuda_graphs=True,
                   residual_dtype="bfloat16", compile_optimizer=True)


class Stop(Exception):
    """Stands in for a killed process: raised from the progress callback."""


def write_corpus(ws: Workspace, megabytes: float) -> int:
    """Curated text from the standard library's .py files (the same files on every machine of an image)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits: dict[str, list[str]] = {"train": [], "validation": []}
    size = 0
    for i, path in enumerate(sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))):
        if "test" in path.parts or size > megabytes * 2**20:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        splits["validation" if i % 10 == 0 else "train"].append(text)  # every tenth file held out
        size += len(text)
    ws.curated_dir.mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        pq.write_table(pa.table({"text": texts}), ws.curated_dir / f"{split}.parquet")
    return size


def training_config(steps: int, gpu: bool, fast: bool, tiny: bool = False) -> TrainingConfig:
    batch, seq = BATCH["tiny" if tiny else "full"]
    phase = PhaseConfig(steps=steps, learning_rate=1e-3, batch_size=batch, seq_len=seq, warmup_steps=10)
    return TrainingConfig(method="pretrain", pretrain=phase,
                          placement=PlacementConfig(use_gpu=gpu, use_ray=False, num_workers=1),
                          logging=LoggingConfig(every=5), checkpointing=CheckpointingConfig(every=steps // 3),
                          validation=TrainValidationConfig(every=steps // 3, batches=1 if tiny else 4),
                          speed=FAST if fast and gpu else SpeedConfig())


def curve(result) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in result.history]


def max_rel(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    assert [s for s, _ in a] == [s for s, _ in b], (a, b)
    return max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="workspace of the runs (default: a new temporary one)")
    parser.add_argument("--steps", type=int, default=None, help="steps of each run (default 60; 6 with --tiny)")
    add_common_arguments(parser, "a tiny GPT-2 with the plain settings on the CPU: a check of this script")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.tiny else 60)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (a checkpoint every third of the run, stopped after the second)")
    import torch

    from lmforge.stages.train import train
    from lmforge.tokenizer.build import load_tokenizer, train_tokenizer
    from lmforge.train.artifacts import greedy_ids, load_probe, load_trained

    gpu, model = not args.tiny, TINY_MODEL if args.tiny else MODEL
    ws = Workspace(args.home or Path(tempfile.mkdtemp(prefix="lmforge-engine-check-"))).ensure()
    report: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu",
                    "settings": FAST.model_dump(exclude_defaults=True) if gpu else {},
                    "corpus_chars": write_corpus(ws, 0.1 if args.tiny else 6.0)}
    train_tokenizer(model, ws)
    fast = training_config(args.steps, gpu, fast=True, tiny=args.tiny)
    begin = time.perf_counter()
    whole = train(fast, model, ws, run_name="whole", progress=lambda row: None)
    report["whole"] = {"s": round(time.perf_counter() - begin, 1), "curve": curve(whole), "metrics": whole.metrics}
    print(json.dumps(report["whole"]), flush=True)

    stop_at = 2 * (args.steps // 3) + 1  # just past the second checkpoint (the next logged step stops it)

    def stop(row: dict) -> None:
        if row["step"] >= stop_at:
            raise Stop(row["step"])

    with contextlib.suppress(Stop):
        train(fast, model, ws, run_name="stopped", progress=stop)
    (root,) = [p for p in (ws.home / "checkpoints").iterdir() if p.name.startswith("stopped")]
    resumed = train(fast, model, ws, resume=root.name, progress=lambda row: None)
    report["resumed"] = {"stopped_at": stop_at, "curve": curve(resumed), "metrics": resumed.metrics,
                         "max_rel_loss_diff_vs_whole": max_rel(curve(resumed), curve(whole))}
    print(json.dumps(report["resumed"]), flush=True)

    plain = train(training_config(args.steps, gpu, fast=False, tiny=args.tiny), model, ws, run_name="plain",
                  progress=lambda row: None)
    report["plain"] = {"curve": curve(plain), "metrics": plain.metrics,
                       "max_rel_loss_diff_vs_whole": max_rel(curve(whole), curve(plain))}
    print(json.dumps(report["plain"]), flush=True)

    tokenizer = load_tokenizer(whole.model_dir)
    probe = load_probe(whole.model_dir)
    reloaded = load_trained(whole.model_dir)  # CPU, float32, transformers' own attention
    got = greedy_ids(reloaded, tokenizer, probe["prompt"], probe["max_new_tokens"])
    report["reload"] = {"probe_ids": probe["completion_ids"], "cpu_ids": got,
                        "agree": sum(a == b for a, b in zip(got, probe["completion_ids"])),
                        "attn": reloaded.config._attn_implementation}
    print(json.dumps(report["reload"]), flush=True)
    out = out_dir(args)
    (out / "train_gpu_engine.json").write_text(json.dumps(report, indent=1))
    print(f"report in {out / 'train_gpu_engine.json'}")
    return 0


if __name__ == "__main__":
    run(main)
