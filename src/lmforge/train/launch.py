"""Launching training: pretraining then fine-tuning, in-line, as torchrun's ranks or as Ray Train workers.

:func:`fit` runs a job for the train stage (:func:`lmforge.stages.train.train`). The same per-worker
function, :func:`run_worker`, runs in this process (``training.placement.use_ray: false``, world
size 1, or one of the ranks torchrun started: :mod:`lmforge.train.torchrun`) or under Ray Train's
``TorchTrainer`` as DDP ranks; Ray is imported only on that path, so
the engine runs where only torch, transformers and peft are installed. Rank 0 writes
``ws.runs_dir/<run_id>/`` in one atomic step (layout: :mod:`lmforge.train.artifacts`). A worker
never assumes the driver's disk: on an object-store workspace it reads cached copies of the inputs
(:mod:`lmforge.core.storage.view`) and commits the run to the store. In-line, checkpoints go to
``ws.checkpoints_dir/<run_id>/`` (mirrored to the store: :mod:`lmforge.train.store_checkpoint`);
under Ray they are reported to Ray Train's storage (:mod:`lmforge.train.ray_checkpoint`), and a
worker that dies is restarted from the latest one up to ``training.checkpointing.max_failures``
times. Either kind is removed once the run succeeds. The stage adds ``train_result.json`` and the ``train`` state hand-off. """

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig
from lmforge.core import errors
from lmforge.core.errors import ConfigError, DataError, LmforgeError
from lmforge.core.progress import step_printer
from lmforge.core.ray_cluster import connect_ray
from lmforge.core.runtime import cpu_count
from lmforge.core.storage import open_store
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace
from lmforge.data.sft import preference_file
from lmforge.data.tokenized import stored_inputs
from lmforge.tokenizer.build import check_chat_template, load_tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train import ray_checkpoint, recovery, store_checkpoint, torchrun, zero
from lmforge.train.loop import is_history_row
from lmforge.train.methods.catalog import check_method
from lmforge.train.relay import RecordRelay
from lmforge.train.worker import Publish, run_phases

START = "start"  # the note rank 0 sends the driver as each attempt starts


def fit(job: dict, training: TrainingConfig, ws: Workspace, ray_address: str | None = None,
        progress: Callable[[dict], None] | None = None, report: Callable[[dict], None] | None = None) -> dict:
    """Run ``job`` (see :func:`lmforge.stages.train.train`) on Ray Train workers or in this process.

    Env ``RAY_ADDRESS`` (else ``ray_address``, i.e. ``platform.ray_address``) names an existing
    cluster; otherwise a local Ray is started when ``training.placement.use_ray`` is set. ``progress``
    receives each history row, ``report`` every record (history rows and validation losses, see
    :func:`lmforge.train.loop.train_phase`; the train stage's MLflow sink); both in this process, as
    rank 0 makes them (under Ray through :mod:`lmforge.train.relay`). Returns rank 0's outcome, with
    ``restarts`` (how often Ray restarted the workers after a failure) and ``resumed_from_step``.
    """
    if not training.placement.use_ray:
        if torchrun.launched():  # rank 0 of torchrun's ranks: the others wait for this job (train/torchrun.py)
            torchrun.hand_over(job)
        return {**run_worker(job, on_log=fan_out(progress or progress_printer(training), report)), "restarts": 0}
    # Rank 0 prints its own progress lines; Ray forwards them to this process.
    return _fit_with_ray(job, training, ws, ray_address,
                         fan_out(progress, report) if progress or report else None)


def fan_out(progress: Callable[[dict], None] | None, report: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """One ``on_log`` for the loop: every record to ``report``, history rows only to ``progress``."""

    def deliver(record: dict) -> None:
        if report is not None:
            report(record)
        if progress is not None and is_history_row(record):
            progress(record)

    return deliver


def run_worker(job: dict, on_log: Callable[[dict], None] | None = None, root: Path | None = None,
               publish: Publish | None = None) -> dict:
    """One rank's whole run: build, pretrain, fine-tune; rank 0 also saves. Returns rank 0's
    ``{"history", "metrics", "params", "resumed_from_step"}`` (every rank computes the same, all-reduced).

    ``root`` and ``publish``: a node's own checkpoint scratch and what reports each checkpoint
    (:func:`lmforge.train.worker.run_phases`); the caller then owns the scratch and its removal."""
    training = TrainingConfig.model_validate(job["training"])
    model_cfg = ModelConfig.model_validate(job["model"])
    ws = Workspace.from_env(job["home"])  # a path, or the store's URL: this node's own side of it
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = _device(training)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Ray may leave a worker with one thread, and ranks sharing a node must not oversubscribe
        # it: small matrices run many times slower when threads outnumber free cores.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(training.cpu_threads or max(1, cpu_count() // local))
    else:
        from lmforge.train.accel.speed import enable_tf32

        enable_tf32()
    run_id = job["run_id"]
    run_dir = ws.runs_dir / run_id
    store = open_store(ws)
    owned = root is None  # the workspace's checkpoint directory, which rank 0 cleans up
    root = root or ckpt.checkpoint_root(ws, run_id)
    if owned and ws.is_remote:  # this node's side of the workspace: the store holds the run's checkpoint
        if job.get("resume") and int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (root / ckpt.LATEST).exists():
            store_checkpoint.restore(ws, run_id, root)
        if dist.is_initialized():
            dist.barrier()  # every rank of the node reads the restored checkpoint once it is complete
        publish = publish or store_checkpoint.publisher(ws, run_id)
    try:
        # The inputs are local paths on any node (cached copies on an object store); rank 0 commits the run's
        # outputs to the workspace's store in one step (locally one rename).
        with local_view(ws, training_inputs(ws) if ws.is_remote else ()) as view, \
                store.atomic_dir(run_dir) if rank == 0 else nullcontext() as out:
            outcome = run_phases(training, model_cfg, view, device, out, run_dir, run_id,
                                 on_log if rank == 0 else None, job["finetune_heldout_fraction"],
                                 resume=job.get("resume", False),
                                 base_adapter=Path(job["base_adapter"]) if job.get("base_adapter") else None,
                                 root=None if owned and not ws.is_remote else root, publish=publish)
    except BaseException:
        if owned and rank == 0 and not (root / ckpt.LATEST).exists():
            shutil.rmtree(root, ignore_errors=True)  # nothing to resume from: only a saved base
        raise
    finally:
        torch.set_num_threads(threads)  # in-line runs share this process with their caller
    if owned and rank == 0:
        shutil.rmtree(root, ignore_errors=True)  # the run is complete: checkpoints served their purpose
        if ws.is_remote:
            store_checkpoint.remove(ws, run_id)
    return outcome


def training_inputs(ws: Workspace) -> list[Path]:
    """What training reads from an object-store workspace: tokenizer, data sets, latest tokenized datasets."""
    return [ws.tokenizer_dir, ws.curated_dir, ws.sft_dir, ws.curated_sft_dir, ws.preferences_dir,
            ws.curated_preferences_dir, *stored_inputs(ws)]


def _fit_with_ray(job: dict, training: TrainingConfig, ws: Workspace, address: str | None,
                  deliver: Callable[[dict], None] | None) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    # Fractional workers on a small machine: reserve logical CPUs generously (PITFALLS).
    need = math.ceil(training.placement.num_workers * training.placement.cpus_per_worker) + 1
    connect_ray(address, num_cpus=max(4, need, os.cpu_count() or 1), _temp_dir=_ray_temp_dir(ws),
                runtime_env={"worker_process_setup_hook": "lmforge.train.launch.quiet_ray_worker"})
    starts: list[dict] = []
    relay = RecordRelay(_counting_starts(starts, deliver))
    job = {**job, "report_to": relay.sink}
    checkpointing = training.checkpointing
    # ray.train.torch.TorchTrainer is Ray Train v2's at runtime (RAY_TRAIN_V2_ENABLED, on by default): the
    # worker's return value comes back as Result.return_value. The names' static types are v1's.
    trainer = TorchTrainer(
        _ray_worker,  # type: ignore[arg-type]  # v1's stub wants a loop returning None
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=training.placement.num_workers, use_gpu=training.placement.use_gpu,
                                     resources_per_worker={"CPU": training.placement.cpus_per_worker,
                                                           **training.placement.resources}),
        # A trainer named after a run that reported checkpoints there resumes it (Ray's own snapshot):
        # that is --resume under Ray. A dead worker restarts the group from the latest one.
        run_config=RunConfig(**recovery.ray_storage_args(ws), name=job["run_id"],
                             failure_config=FailureConfig(max_failures=checkpointing.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=checkpointing.keep)),
    )
    try:
        outcome = trainer.fit().return_value  # type: ignore[attr-defined]  # v2's Result (see above)
    except BaseException as exc:
        relay.close(raise_error=False)  # the records of a failed run still arrive; its error is the one raised
        if isinstance(exc, TrainingFailedError):
            raise LmforgeError(
                f"training run {job['run_id']} failed on its Ray workers after {max(0, len(starts) - 1)} restarts "
                f"(training.checkpointing.max_failures: {checkpointing.max_failures}): {str(exc).splitlines()[0]}",
                f"fix what the worker's error says, then continue the run from its latest checkpoint: "
                f"lmforge train CONFIG --resume {job['run_id']}") from exc
        raise
    relay.close()
    if "error" in outcome:  # one of ours, returned rather than raised: Ray would retry it, to the same end
        name, cause, fix = outcome["error"]
        kind = getattr(errors, name, None)
        raise (kind if isinstance(kind, type) and issubclass(kind, LmforgeError) else LmforgeError)(cause, fix)
    recovery.delete_ray_run(ws, job["run_id"])  # complete: its checkpoints served their purpose
    return {**outcome, "restarts": max(0, len(starts) - 1)}


def _counting_starts(starts: list[dict], deliver: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """The relay's delivery: each attempt's start note (rank 0 sends one per start) counted, the rest delivered."""

    def receive(record: dict) -> None:
        if record.get("event") == START:
            starts.append(record)
        elif deliver is not None:
            deliver(record)

    return receive


def progress_printer(training: TrainingConfig) -> Callable[[dict], None]:
    """Bar lines per logged step; fine-tuning steps continue the pretraining count in history."""
    pretrain_steps = training.pretrain.steps
    return step_printer("train", {"pretrain": pretrain_steps, "finetune": training.finetune.steps},
                        {"finetune": pretrain_steps})


def _ray_worker(job: dict) -> dict:
    """One Ray Train worker, on every (re)start: restore the latest reported checkpoint, then train.

    Our own errors are returned, not raised: Ray restarts the workers after any raised error, and a
    diverged loss or a wrong setting would only fail again (every rank returns the same one)."""
    from ray import train

    sink = job["report_to"]  # a QueueSink: rank 0's records go live to the driver
    rank = train.get_context().get_world_rank()
    try:
        root, restored = ray_checkpoint.prepare(job["run_id"])
        if rank == 0:
            sink({"event": START, "restored": restored})
        if job.get("resume") and not restored:
            # A run stopped in-line (or before Ray kept any checkpoint): the workspace's checkpoints, as before.
            return run_worker(job, on_log=_worker_log(job, sink), publish=ray_checkpoint.report)
        outcome = run_worker({**job, "resume": restored}, on_log=_worker_log(job, sink), root=root,
                             publish=ray_checkpoint.report)
        ray_checkpoint.remove_scratch(root)
        return outcome
    except LmforgeError as exc:
        return {"error": [type(exc).__name__, exc.cause, exc.fix]}
    finally:
        sink.flush()  # before the driver hears that this worker is done


def _worker_log(job: dict, sink: Callable[[dict], None]) -> Callable[[dict], None]:
    return fan_out(progress_printer(TrainingConfig.model_validate(job["training"])), sink)


def quiet_ray_worker() -> None:
    """Ray worker setup hook for the local, dashboard-less Ray started by :func:`train`.

    Without a dashboard there is no State API, so Ray Train's placement-group cleaner (which
    polls it) warns every second for the whole run while being unable to act; mute just that.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _ray_temp_dir(ws: Workspace) -> str:
    # Ray puts unix sockets under its temp dir; their paths must stay under ~107 bytes.
    inside = ws.ray_dir / "tmp"
    if len(str(inside)) <= 40:
        return str(inside)
    return str(Path(tempfile.gettempdir()) / f"lmforge-ray-{uuid.uuid5(uuid.NAMESPACE_URL, str(ws.home)).hex[:8]}")


def _device(training: TrainingConfig) -> torch.device:
    if not training.placement.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("training.placement.use_gpu is true but torch sees no CUDA device",
                          "set training.placement.use_gpu: false, or install a CUDA build of torch on a GPU machine")
    return torch.device("cuda", torch.cuda.current_device())


# Architectures with a learned position table: no position past model.max_seq_len exists.
ABSOLUTE_POSITIONS = ("gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt")


def check_inputs(training: TrainingConfig, model_cfg: ModelConfig, ws: Workspace) -> None:
    """Fail before any worker starts, with the stage or setting that fixes it."""
    zero.require(training)  # strategy deepspeed: the package, on the driver too
    if not (ws.tokenizer_dir / "tokenizer_config.json").exists():
        raise DataError(f"no tokenizer at {ws.tokenizer_dir}",
                        "train one first: `python -m lmforge.train` does it, or the pipeline's tokenize stage")
    check_chat_template(load_tokenizer(ws.tokenizer_dir), model_cfg, ws.tokenizer_dir)
    tp_problem = None if model_cfg.base_model else training.parallel.model_problem(  # a base's heads: on the workers
        model_cfg.architecture, model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.num_layers)
    if tp_problem is not None:
        raise ConfigError(*tp_problem)
    finetuning = training.finetunes
    if finetuning:
        check_method(training, use_cuda=training.placement.use_gpu)
    if training.pretrain.steps > 0 and not (ws.curated_dir / "train.parquet").exists():
        raise DataError(f"no curated text at {ws.curated_dir / 'train.parquet'}", "run the curate stage first")
    if finetuning and training.preference_tuning:
        if not preference_file(ws, "train").exists():
            raise ConfigError(f"training.preference.loss is {training.preference.loss} (training.method: "
                              f"{training.preference.loss}), but there is no preference set at "
                              f"{preference_file(ws, 'train')}", "list your (prompt, chosen, rejected) data under "
                              "data.preferences.sources and run `lmforge collect`, or fine-tune on instructions "
                              "(training.method: lora, no preference.loss)")
    elif finetuning and not (ws.sft_dir / "train.jsonl").exists():
        raise DataError(f"no SFT examples at {ws.sft_dir / 'train.jsonl'}",
                        "run the collect stage first, or set training.method: pretrain")
    if not model_cfg.base_model:
        for name, phase in (("pretrain", training.pretrain), ("finetune", training.finetune)):
            runs = phase.steps > 0 and (name == "pretrain" or finetuning)
            if runs and phase.seq_len > model_cfg.max_seq_len:
                raise ConfigError(f"training.{name}.seq_len ({phase.seq_len}) exceeds model.max_seq_len "
                                  f"({model_cfg.max_seq_len})", "lower the seq_len or raise model.max_seq_len")
        # Prompt-learning methods put their virtual tokens (or prefix) before every sequence; a model
        # with a learned position table (GPT-2 style) has no positions past it (rotary ones do).
        prompt_methods = ("prefix", "ptuning_v2", "prompt", "ptuning")
        virtual = training.prompt_learning.num_virtual_tokens if training.method in prompt_methods else 0
        too_long = finetuning and virtual and training.finetune.seq_len + virtual > model_cfg.max_seq_len
        if too_long and model_cfg.architecture in ABSOLUTE_POSITIONS:
            raise ConfigError(
                f"training.finetune.seq_len ({training.finetune.seq_len}) plus the {virtual} virtual tokens of "
                f"training.method {training.method} exceeds model.max_seq_len ({model_cfg.max_seq_len}), the "
                f"{model_cfg.architecture} position table", "lower training.finetune.seq_len or "
                "training.prompt_learning.num_virtual_tokens (or raise model.max_seq_len)")
    if training.pretrain.steps == 0 and not finetuning and not model_cfg.base_model:
        raise ConfigError("nothing to train: no pretraining steps, no fine-tuning steps and no base_model",
                          "set training.pretrain.steps or training.finetune.steps above 0, or model.base_model")
    from lmforge.model.info import MemoryEstimateWarning, fit_warning

    warning = fit_warning(model_cfg, training, _vocab_size(ws))
    if warning:
        warnings.warn(warning, MemoryEstimateWarning, stacklevel=3)


def _vocab_size(ws: Workspace) -> int:
    return len(load_tokenizer(ws.tokenizer_dir))
