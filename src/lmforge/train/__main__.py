"""Train standalone, without Prefect, MLflow or Ray: ``python -m lmforge.train [CONFIG] [--ray] [--resume [RUN_ID]]``.

Trains the tokenizer when the workspace (``LMFORGE_HOME``) has none, then runs both training
phases in this process (``--ray`` launches Ray Train workers as the config says instead). Started by
``torchrun --nproc-per-node N -m lmforge.train CONFIG``, its N processes are the run's ranks
(:mod:`lmforge.train.torchrun`), and rank 0 prints what a lone process prints.
``--resume RUN_ID`` continues a run that wrote checkpoints (``training.checkpointing``) from its
latest one, exactly (without an id: the newest run that left one). Prints a summary and, as the
last line, one JSON object with the run's facts.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from lmforge.config.loader import load_config
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.workspace import Workspace
from lmforge.train import torchrun
from lmforge.train.recovery import LATEST_RUN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="pipeline YAML file (default: built-in defaults)")
    parser.add_argument("--ray", action="store_true", help="launch through Ray Train (training.placement.use_ray)")
    parser.add_argument("--run-name", default=None, help="prefix of the run id")
    parser.add_argument("--resume", default=None, nargs="?", const=LATEST_RUN, metavar="RUN_ID",
                        help="continue this run (default: the newest stopped one) from its latest checkpoint")
    parser.add_argument("--home", default=None, help="workspace directory (default: $LMFORGE_HOME)")
    args = parser.parse_args(argv)
    try:
        if torchrun.launched():
            result = _run_rank(args)
            if result is None:  # a rank above 0: rank 0 reports the run
                return 0
        else:
            result = _run(args)
    except LmforgeError as exc:
        print(f"error: {exc.cause}\nfix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    print(f"run {result.run_id}: model at {result.model_dir} ({result.duration_s:.1f} s)")
    for name, value in sorted(result.metrics.items()):
        print(f"  {name:<20} {value:.4f}")
    print(json.dumps({k: v for k, v in result.as_dict().items() if k != "history"}, default=str))
    return 0


def _run_rank(args: argparse.Namespace):
    """One of torchrun's ranks: rank 0 runs the stage (:func:`_run`) and returns its result; the others run the
    job it hands over and return None."""
    from lmforge.train.launch import run_worker

    if args.ray:
        raise ConfigError("--ray under torchrun: torchrun has started the ranks already",
                          "drop --ray (or start one process without torchrun to launch Ray Train workers)")
    config = load_config(args.config)
    rank = torchrun.join(config.training.placement.use_gpu)
    try:
        if rank == 0:
            with torchrun.leading():
                return _run(args)
        job = torchrun.follow()
        if job is None:
            raise LmforgeError("rank 0 stopped before training (its error is above)", "fix what rank 0 reports")
        run_worker(job)
        return None
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace):
    from lmforge.stages.base_model import resolve_base
    from lmforge.stages.train import train
    from lmforge.tokenizer.build import train_tokenizer

    config = load_config(args.config)
    ws = Workspace.from_env(args.home).ensure()
    placement = config.training.placement.model_copy(update={"use_ray": args.ray})
    training = config.training.model_copy(update={"placement": placement})
    if not (ws.tokenizer_dir / "tokenizer_config.json").exists():
        # A models:/ base is looked up in the registry (no run is tracked): its own tokenizer is copied.
        print(f"training tokenizer into {train_tokenizer(resolve_base(config.model, ws, config.platform).model, ws)}")

    def progress(row: dict) -> None:
        print(f"  {row['phase']:<9} step {row['step']:>5}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
              f"{row['tokens_per_s']:.0f} tok/s", flush=True)

    return train(training, config.model, ws, run_name=args.run_name, progress=progress,
                 ray_address=config.platform.ray_address, resume=args.resume,
                 finetune_heldout_fraction=config.tokenize.finetune_heldout_fraction, platform=config.platform)


if __name__ == "__main__":
    sys.exit(main())
