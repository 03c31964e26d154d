"""Benchmark: what orchestration costs the training stage, CPU. The pipeline's train task as the
pipeline runs it (a Prefect flow run on a real Prefect server, Ray Train with one worker, MLflow
tracking on SQLite) against the bare in-line loop (no Prefect, no Ray, no MLflow), in one job.

    .venv/bin/python -m bench.platform.overhead [--steps 100] [--skip 10] [--log-every 10] [--pairs 2] [--tiny] [--out DIR]

Both runs train the same model for the same steps on the same tokenized datasets (stdlib text,
tokenized once by the tokenize stage), with the same training config but for
``training.placement.use_ray``; a history row every ``--log-every`` steps (the pipeline's default
10, so MLflow gets as many rows as in a pipeline run). The two paths run alternately ``--pairs``
times and each figure is a path's best: the machine is shared and its load only adds time.
Reported, each against the bare loop:

* **steady step time**: the median, over the intervals between history rows after step ``--skip``,
  of an interval's seconds per step. The times come from the rows as the worker made them (a row's
  ``tokens_per_s`` is the phase's tokens so far over its time so far, and every step has
  ``batch_size x seq_len`` tokens), so the relay's delay to the driver does not count. Goal: at
  most 5% slower.
* **fixed start-up**: wall time minus steps x steady step time: what a run costs beyond its steps
  (building the model, validation, saving; and for the orchestrated run the flow and task runs,
  starting Ray and its worker, opening and closing the MLflow run). The figure held to the goal
  (at most 30 s) is the orchestrated run's fixed time minus the bare loop's. On a busy machine
  that also holds the steps the load slowed, so ``outside_steps_s`` (wall time minus the steps'
  measured times) is recorded beside it.

The Prefect server is a service a user starts once (``lmforge stack up`` / ``lmforge ui``), so its
start is not timed: ``PREFECT_API_URL`` names one to use, else this script starts ``prefect server
start`` on loopback first. Ray is started by the run, as the train stage starts it, and is timed.
``--tiny``: a tiny model and 6 steps, a check of this script. Figures go to
OUT/platform_overhead.jsonl (``bench.common.record``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.train.gpu_engine import write_corpus
from lmforge.config import PipelineConfig
from lmforge.config.model import ModelConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import LoggingConfig, PhaseConfig, PlacementConfig, TrainingConfig, TrainValidationConfig
from lmforge.core.errors import ConfigError
from lmforge.core.runtime import prepare_environment
from lmforge.core.workspace import Workspace
from lmforge.stack.processes import free_port

BENCH = "platform_overhead"
# About 3M parameters: a step takes about half a second on two quiet cores, long against per-step overheads.
MODEL = ModelConfig(architecture="llama", vocab_size=4096, hidden_size=192, num_layers=4, num_heads=4,
                    num_kv_heads=2, intermediate_size=512, max_seq_len=256)
TINY_MODEL = MODEL.model_copy(update=dict(vocab_size=512, hidden_size=64, num_layers=2, intermediate_size=128,
                                          max_seq_len=64))
BATCH = {"full": (8, 128), "tiny": (4, 32)}  # batch size, sequence length
CORPUS_MB = {"full": 3.0, "tiny": 0.1}


def training_config(steps: int, tiny: bool, use_ray: bool, log_every: int) -> TrainingConfig:
    """The two runs' config: equal but for ``use_ray``; a history row every ``log_every`` steps."""
    batch, seq = BATCH["tiny" if tiny else "full"]
    return TrainingConfig(method="pretrain",
                          pretrain=PhaseConfig(steps=steps, learning_rate=1e-3, batch_size=batch, seq_len=seq,
                                               warmup_steps=min(10, steps // 2)),
                          placement=PlacementConfig(use_ray=use_ray, num_workers=1, cpus_per_worker=1),
                          logging=LoggingConfig(every=log_every), validation=TrainValidationConfig(batches=2))


def prepare(ws: Workspace, model: ModelConfig, training: TrainingConfig, megabytes: float) -> str:
    """Curated text, a tokenizer and the tokenized datasets both runs read; returns their digest."""
    from lmforge.stages.tokenize import tokenize

    write_corpus(ws, megabytes)
    result = tokenize(TokenizeConfig(), model, training, ws)
    if not result.digest:
        raise ConfigError("the tokenize stage built no tokenized datasets", "check TokenizeConfig.build_datasets")
    return result.digest


def elapsed(history: list[dict], tokens_per_step: int) -> list[tuple[int, float]]:
    """(step, seconds since the phase began) of each history row (see the module docstring)."""
    rows = sorted((int(r["step"]), r["tokens_per_s"]) for r in history if r.get("phase") == "pretrain")
    return [(step, step * tokens_per_step / rate) for step, rate in rows]


def summary(name: str, history: list[dict], wall_s: float, steps: int, skip: int, tokens_per_step: int) -> dict:
    """A run's figures. The steady step time is the median, over the intervals between history rows
    that start at or after step ``skip``, of an interval's seconds per step. ``fixed_s`` is wall time
    minus ``steps`` x that; on a busy machine it also holds every step the load slowed.
    ``outside_steps_s`` leaves those out: wall time minus the measured time from the first row to the
    last, minus the steady time of the steps up to the first row (whose time also holds the
    validation before it)."""
    marks = elapsed(history, tokens_per_step)
    times = [(b - a) / (sb - sa) for (sa, a), (sb, b) in itertools.pairwise(marks) if sa >= skip]
    if len(times) < 2:
        raise ConfigError(f"the {name} run logged {len(times)} intervals after step {skip}",
                          "raise --steps, or lower --skip or --log-every")
    steady = statistics.median(times)
    return {"run": name, "wall_s": round(wall_s, 3), "steady_s_per_step": steady,
            "interval_s_per_step_min": min(times), "interval_s_per_step_max": max(times),
            "fixed_s": wall_s - steps * steady,
            "outside_steps_s": wall_s - (marks[-1][1] - marks[0][1]) - marks[0][0] * steady,
            "intervals_timed": len(times)}


def best(runs: list[dict]) -> dict:
    """Each figure's best (lowest) over a path's runs: the machine is shared, and load only adds time."""
    return {key: min(r[key] for r in runs) for key in ("wall_s", "steady_s_per_step", "fixed_s", "outside_steps_s")}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bare_run(ws: Workspace, model: ModelConfig, training: TrainingConfig) -> tuple[list[dict], float]:
    """The train stage in-line (``use_ray: false``) with no MLflow experiment and no Prefect."""
    from lmforge.stages.train import train

    started = time.perf_counter()
    result = train(training, model, ws, run_name="bare")  # its progress lines, as the Ray worker prints its own
    return result.history, time.perf_counter() - started


def orchestrated_run(ws: Workspace, config: PipelineConfig) -> tuple[list[dict], float]:
    """The pipeline's train task, with the arguments flows/pipeline.py gives it, in a flow run.

    Imported here, after ``PREFECT_API_URL`` is set: Prefect reads its settings on import."""
    from prefect import flow
    from prefect.logging.handlers import APILogWorker

    from tasks.training import train_task

    @flow(name="lmforge-bench-train-stage")
    def train_stage(config: PipelineConfig) -> dict:
        return train_task(config.training, config.model, config.platform, config.tokenize.finetune_heldout_fraction,
                          config.registry.experiment)

    started = time.perf_counter()
    result = train_stage(config)
    wall = time.perf_counter() - started
    APILogWorker.drain_all(timeout=30)  # the run's last logs reach the server before this script stops it
    if not result.get("mlflow_run_id"):
        raise ConfigError("the orchestrated run was not tracked in MLflow", "set registry.experiment")
    return result["history"], wall


@contextmanager
def prefect_api(home: Path) -> Iterator[str]:
    """``PREFECT_API_URL`` if set, else a ``prefect server start`` on loopback for the job's length."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = (home / "prefect-server.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env={**os.environ, "PREFECT_HOME": str(home / "prefect")},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"the Prefect server did not start (log: {home / 'prefect-server.log'})",
                                      "set PREFECT_API_URL to a running Prefect server") from None
                time.sleep(1)
        os.environ["PREFECT_API_URL"] = api
        yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps of each run (default 100; 6 with --tiny)")
    parser.add_argument("--skip", type=int, default=None, help="first steps left out of the steady step time "
                        "(default 10; 1 with --tiny)")
    parser.add_argument("--log-every", type=int, default=None, help="training.logging.every of both runs "
                        "(default 10, the pipeline's; 1 with --tiny)")
    parser.add_argument("--pairs", type=int, default=None, help="runs of each path, alternating, best kept "
                        "(default 2; 1 with --tiny)")
    add_common_arguments(parser, "a tiny model and 6 steps: a check of this script")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.tiny else 100)
    args.skip = (1 if args.tiny else 10) if args.skip is None else args.skip
    args.log_every = args.log_every or (1 if args.tiny else 10)
    args.pairs = args.pairs or (1 if args.tiny else 2)
    if args.steps < args.skip + 2 * args.log_every:
        raise ConfigError(f"--steps {args.steps} leaves fewer than 2 logged intervals after --skip {args.skip}",
                          "raise --steps, or lower --skip or --log-every")
    out = out_dir(args)
    size = "tiny" if args.tiny else "full"
    model = TINY_MODEL if args.tiny else MODEL
    batch, seq = BATCH[size]
    command = (f".venv/bin/python -m bench.platform.overhead --steps {args.steps} --skip {args.skip} "
               f"--log-every {args.log_every} --pairs {args.pairs}" + (" --tiny" if args.tiny else ""))
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-overhead-") as tmp:
        ws = Workspace(Path(tmp) / "home")
        # What the CLI sets before `lmforge run` (MLflow's synchronous logging, LMFORGE_HOME for the
        # task's Workspace.from_env(), ...), for both runs alike.
        prepare_environment(ws)
        bare_cfg = training_config(args.steps, args.tiny, use_ray=False, log_every=args.log_every)
        digest = prepare(ws, model, bare_cfg, CORPUS_MB[size])
        config = PipelineConfig(model=model, training=training_config(args.steps, args.tiny, use_ray=True,
                                                                      log_every=args.log_every))
        load = os.getloadavg()
        runs: dict[str, list[dict]] = {"bare": [], "prefect+ray+mlflow": []}
        with prefect_api(Path(tmp)):
            for _ in range(args.pairs):
                runs["bare"].append(summary("bare", *bare_run(ws, model, bare_cfg), args.steps, args.skip,
                                            batch * seq))
                print(json.dumps(runs["bare"][-1]), flush=True)
                runs["prefect+ray+mlflow"].append(summary("prefect+ray+mlflow", *orchestrated_run(ws, config),
                                                          args.steps, args.skip, batch * seq))
                print(json.dumps(runs["prefect+ray+mlflow"][-1]), flush=True)
                _stop_ray()  # each orchestrated run starts its own Ray, as a run of the pipeline does
        load_end = os.getloadavg()
    bare, orchestrated = best(runs["bare"]), best(runs["prefect+ray+mlflow"])
    baseline = (f"bare in-line train stage (no Prefect, Ray or MLflow), same job, same tokenized data "
                f"{digest[:12]}, {args.steps} steps of {batch}x{seq} tokens, best of {args.pairs} alternating runs")
    figures = [
        ("steady_s_per_step", orchestrated["steady_s_per_step"], "s/step", bare["steady_s_per_step"]),
        ("fixed_s", orchestrated["fixed_s"], "s", bare["fixed_s"]),
        ("added_fixed_s", orchestrated["fixed_s"] - bare["fixed_s"], "s", None),
        ("outside_steps_s", orchestrated["outside_steps_s"], "s", bare["outside_steps_s"]),
        ("added_outside_steps_s", orchestrated["outside_steps_s"] - bare["outside_steps_s"], "s", None),
        ("wall_s", orchestrated["wall_s"], "s", bare["wall_s"]),
    ]
    for metric, value, unit, base in figures:
        row = record(BENCH, metric, round(value, 4), unit, baseline, None if base is None else round(base, 4),
                     command=command, higher_is_better=False, out_dir=out)
        print(json.dumps(row))
    slower = orchestrated["steady_s_per_step"] / bare["steady_s_per_step"] - 1
    added = orchestrated["fixed_s"] - bare["fixed_s"]
    added_outside = orchestrated["outside_steps_s"] - bare["outside_steps_s"]
    print(f"steady step {orchestrated['steady_s_per_step']:.4f}s vs bare {bare['steady_s_per_step']:.4f}s "
          f"({slower:+.1%}; goal at most +5%: {'met' if slower <= 0.05 else 'NOT met'}); fixed start-up "
          f"{orchestrated['fixed_s']:.1f}s vs bare {bare['fixed_s']:.1f}s (+{added:.1f}s; goal at most 30 s: "
          f"{'met' if added <= 30 else 'NOT met'}); outside the steps +{added_outside:.1f}s; best of {args.pairs} "
          f"runs each; load average (1 min) {load[0]:.2f} before the runs, {load_end[0]:.2f} after", file=sys.stderr)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    run(main)
