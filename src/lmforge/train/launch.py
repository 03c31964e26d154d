"""The train stage: pretraining then fine-tuning, in-line or as Ray Train workers.

:func:`train` is the entry point. The same per-worker function, :func:`run_worker`, runs in this
process (``training.use_ray: false``, world size 1) or under Ray Train's ``TorchTrainer`` as DDP
ranks; Ray is imported only on that path, so the engine runs where only torch, transformers and
peft are installed. Rank 0 writes ``ws.runs_dir/<run_id>/`` in one atomic rename:
``model/`` (merged, safetensors, tokenizer), and with LoRA ``adapter/`` plus the ``base/`` it
adapts. The driver adds ``train_result.json`` and the ``train`` state hand-off.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from lmforge.config.stages import LoraConfig, ModelConfig, PhaseConfig, TrainingConfig
from lmforge import errors
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.model import build_model, count_parameters
from lmforge.prompt import format_prompt
from lmforge.tokenizer import load_tokenizer
from lmforge.train.data import batch_stream, encode_sft, fixed_batches, pack_texts, read_sft, read_texts, split_heldout
from lmforge.train.loop import train_phase
from lmforge.progress import step_printer
from lmforge.workspace import Workspace, atomic_dir, atomic_write_json

PROBE_FILE = "lmforge_probe.json"
PROBE_INSTRUCTION = "What does `json.dumps` do?"
PROBE_TOKENS = 8


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_dir: Path
    adapter_dir: Path | None
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        out["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return out


def train(training: TrainingConfig, model_cfg: ModelConfig, ws: Workspace, run_name: str | None = None,
          progress: Callable[[dict], None] | None = None, ray_address: str | None = None) -> TrainResult:
    """Train a model from ``ws``'s tokenizer and data; return where it is and how it went.

    ``progress`` receives each history row (live in-line; replayed after the run under Ray).
    Env ``RAY_ADDRESS`` (else ``ray_address``, i.e. ``platform.ray_address``) names an existing
    cluster; otherwise a local Ray is started when ``training.use_ray`` is set.
    """
    started = time.perf_counter()
    _check_inputs(training, model_cfg, ws)
    run_id = _new_run_id(run_name)
    job = {"training": training.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json"),
           "home": str(ws.home), "run_id": run_id}
    if training.use_ray:
        # Rank 0 prints its own progress lines; Ray forwards them to this process.
        outcome = _fit_with_ray(job, training, ws, ray_address)
        if progress is not None:
            for record in outcome["history"]:
                progress(record)
    else:
        outcome = run_worker(job, on_log=progress or progress_printer(training))
    run_dir = ws.runs_dir / run_id
    lora = training.finetune_method == "lora" and training.finetune.steps > 0
    params = {**_flatten({"training": job["training"], "model": job["model"]}), **outcome["params"]}
    result = TrainResult(run_id=run_id, model_dir=run_dir / "model", adapter_dir=run_dir / "adapter" if lora else None,
                         history=outcome["history"], metrics=outcome["metrics"], params=params,
                         duration_s=round(time.perf_counter() - started, 3))
    atomic_write_json(run_dir / "train_result.json", result.as_dict())
    ws.write_state("train", result.as_dict())
    return result


def run_worker(job: dict, on_log: Callable[[dict], None] | None = None) -> dict:
    """One rank's whole run: build, pretrain, fine-tune; rank 0 also saves. Returns rank 0's
    ``{"history", "metrics", "params"}`` (every rank computes the same, all-reduced)."""
    training = TrainingConfig.model_validate(job["training"])
    model_cfg = ModelConfig.model_validate(job["model"])
    ws = Workspace(Path(job["home"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = _device(training)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Ray may leave a worker with one thread, and ranks sharing a node must not oversubscribe
        # it: small matrices run many times slower when threads outnumber free cores.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(training.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local))
    run_dir = ws.runs_dir / job["run_id"]
    try:
        with atomic_dir(run_dir) if rank == 0 else nullcontext() as out:
            return _run_phases(training, model_cfg, ws, device, out, run_dir, on_log if rank == 0 else None)
    finally:
        torch.set_num_threads(threads)  # in-line runs share this process with their caller


def _run_phases(training: TrainingConfig, model_cfg: ModelConfig, ws: Workspace, device: torch.device,
                out: Path | None, run_dir: Path, on_log: Callable[[dict], None] | None) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tokenizer = load_tokenizer(ws.tokenizer_dir)
    torch.manual_seed(training.seed)
    model = build_model(model_cfg, len(tokenizer))
    _set_special_ids(model, tokenizer)
    model.to(device)
    history: list[dict] = []
    metrics: dict[str, float] = {}
    params: dict[str, Any] = {"params_total": count_parameters(model), "world_size": world}
    phases = [("pretrain", training.pretrain, "pretrain")]
    if training.finetune_method != "none":
        phases.append(("finetune", training.finetune, training.finetune_method))
    for seed_offset, (name, phase, method) in enumerate(phases):
        if phase.steps == 0:
            continue
        if method == "lora":
            if out is not None:  # the adapter is useless without the exact weights it adapts
                model.save_pretrained(out / "base")
                tokenizer.save_pretrained(out / "base")
            model = _with_lora(model, training.lora)
        params[f"params_trainable_{name}"] = count_parameters(model, trainable_only=True)
        train_rows, val_rows = _phase_data(name, tokenizer, ws, phase)
        batches = batch_stream(train_rows, phase.batch_size, seed=training.seed + seed_offset,
                               rank=rank, world_size=world)
        val = fixed_batches(val_rows, phase.batch_size, training.val_batches, rank=rank,
                            world_size=world) if val_rows else []
        phase_history, phase_metrics = train_phase(model, name, phase, training, batches, val, device,
                                                   on_log=on_log,
                                                   step_offset=history[-1]["step"] if history else 0)
        history += phase_history
        metrics.update(phase_metrics)
    if out is not None:
        _save(model, tokenizer, out, run_dir)
    return {"history": history, "metrics": metrics, "params": params}


def _phase_data(name: str, tokenizer, ws: Workspace, phase: PhaseConfig) -> tuple[dict, dict | None]:
    """(training rows, held-out rows or None) as tensors for one phase."""
    if name == "pretrain":
        train_rows = pack_texts(read_texts(ws.curated_dir / "train.parquet"), tokenizer, phase.seq_len)
        val_path = ws.curated_dir / "validation.parquet"
        val_texts = read_texts(val_path) if val_path.exists() else []
        val_rows = pack_texts(val_texts, tokenizer, phase.seq_len, allow_short=True) if val_texts else None
        return train_rows, val_rows
    records, heldout = split_heldout(read_sft(ws.sft_dir / "train.jsonl"))
    val_rows = encode_sft(heldout, tokenizer, phase.seq_len) if heldout else None
    return encode_sft(records, tokenizer, phase.seq_len), val_rows


def _with_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(f"LoRA target modules {cfg.target_modules} do not fit this model: {exc}",
                          f"set training.lora.target_modules to some of {linear}") from None


def _save(model, tokenizer, out: Path, run_dir: Path) -> None:
    """Write model/ (and adapter/ for LoRA) into the staging dir ``out`` of ``run_dir``."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        # Point the adapter at the base saved beside it (its final path, after the rename).
        model.peft_config["default"].base_model_name_or_path = str(run_dir / "base")
        # The vocabulary never changes here; "auto" would look the base up on a hub.
        model.save_pretrained(out / "adapter", save_embedding_layers=False)
        model = model.merge_and_unload()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    # A greedy completion of the in-memory model: loading the directory must reproduce it.
    prompt = format_prompt(PROBE_INSTRUCTION)
    atomic_write_json(out / "model" / PROBE_FILE, {"prompt": prompt, "max_new_tokens": PROBE_TOKENS,
                                                    "completion_ids": greedy_ids(model, tokenizer, prompt)})


@torch.no_grad()
def greedy_ids(model, tokenizer, prompt: str, max_new_tokens: int = PROBE_TOKENS) -> list[int]:
    """Token ids ``model`` greedily appends to ``prompt`` (the reload check of a saved model)."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _fit_with_ray(job: dict, training: TrainingConfig, ws: Workspace, address: str | None) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or address
        if address:
            ray.init(address=address)
        else:
            # Fractional workers on a small machine: reserve logical CPUs generously (PITFALLS).
            need = math.ceil(training.num_workers * training.cpus_per_worker) + 1
            ray.init(num_cpus=max(4, need, os.cpu_count() or 1), include_dashboard=False,
                     _temp_dir=_ray_temp_dir(ws),
                     runtime_env={"worker_process_setup_hook": "lmforge.train.launch.quiet_ray_worker"})
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=training.num_workers, use_gpu=training.use_gpu,
                                     resources_per_worker={"CPU": training.cpus_per_worker}),
        run_config=RunConfig(storage_path=str(ws.ray_dir / "train"), name=job["run_id"]),
    )
    try:
        return trainer.fit().return_value
    except TrainingFailedError as exc:
        # Show the user our own error (cause + fix), not Ray's wrapper around a worker traceback.
        for failure in getattr(exc, "worker_failures", {}).values():
            carried = getattr(failure, "_base_exc", failure)
            if isinstance(carried, _CarriedError):
                name, cause, fix = carried.args
                kind = getattr(errors, name, None)
                if not (isinstance(kind, type) and issubclass(kind, LmforgeError)):
                    kind = LmforgeError
                raise kind(cause, fix) from None
        raise


class _CarriedError(Exception):
    """An LmforgeError on its way from a Ray worker to the driver.

    LmforgeError takes (cause, fix) but keeps only ``cause`` in ``args``, so it cannot survive
    the two pickling hops (worker, controller, driver); plain string args always do.
    """

    def __init__(self, name: str, cause: str, fix: str) -> None:
        super().__init__(name, cause, fix)


def progress_printer(training: TrainingConfig) -> Callable[[dict], None]:
    """Bar lines per logged step; fine-tuning steps continue the pretraining count in history."""
    pretrain_steps = training.pretrain.steps
    return step_printer("train", {"pretrain": pretrain_steps, "finetune": training.finetune.steps},
                        {"finetune": pretrain_steps})


def _ray_worker(job: dict) -> dict:
    try:
        return run_worker(job, on_log=progress_printer(TrainingConfig.model_validate(job["training"])))
    except LmforgeError as exc:
        raise _CarriedError(type(exc).__name__, exc.cause, exc.fix) from exc


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
    if not training.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("training.use_gpu is true but torch sees no CUDA device",
                          "set training.use_gpu: false, or install a CUDA build of torch on a GPU machine")
    return torch.device("cuda", torch.cuda.current_device())


def _set_special_ids(model, tokenizer) -> None:
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id


def _check_inputs(training: TrainingConfig, model_cfg: ModelConfig, ws: Workspace) -> None:
    """Fail before any worker starts, with the stage or setting that fixes it."""
    if not (ws.tokenizer_dir / "tokenizer_config.json").exists():
        raise DataError(f"no tokenizer at {ws.tokenizer_dir}",
                        "train one first: `python -m lmforge.train` does it, or the pipeline's tokenize stage")
    finetuning = training.finetune_method != "none" and training.finetune.steps > 0
    if training.pretrain.steps > 0 and not (ws.curated_dir / "train.parquet").exists():
        raise DataError(f"no curated text at {ws.curated_dir / 'train.parquet'}", "run the curate stage first")
    if finetuning and not (ws.sft_dir / "train.jsonl").exists():
        raise DataError(f"no SFT examples at {ws.sft_dir / 'train.jsonl'}",
                        "run the collect stage first, or set training.finetune_method: none")
    if not model_cfg.base_model:
        for name, phase in (("pretrain", training.pretrain), ("finetune", training.finetune)):
            runs = phase.steps > 0 and (name == "pretrain" or finetuning)
            if runs and phase.seq_len > model_cfg.max_seq_len:
                raise ConfigError(f"training.{name}.seq_len ({phase.seq_len}) exceeds model.max_seq_len "
                                  f"({model_cfg.max_seq_len})", "lower the seq_len or raise model.max_seq_len")
    if training.pretrain.steps == 0 and not finetuning and not model_cfg.base_model:
        raise ConfigError("nothing to train: no pretraining steps, no fine-tuning steps and no base_model",
                          "set training.pretrain.steps or training.finetune.steps above 0, or model.base_model")


def _new_run_id(run_name: str | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or "train").strip("-.") or "train"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}-{uuid.uuid4().hex[:6]}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def load_probe(model_dir: Path) -> dict:
    """The greedy completion recorded when ``model_dir`` was saved (see :func:`greedy_ids`)."""
    return json.loads((Path(model_dir) / PROBE_FILE).read_text())
