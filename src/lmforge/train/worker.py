"""One rank's whole run: build the model, run each phase through the loop (resuming if asked), save.

:func:`run_phases` is called by :func:`lmforge.train.launch.run_worker`, in-line or on every Ray
Train worker. Pretraining trains all weights; the fine-tuning phase trains what ``training.method``
says (:mod:`lmforge.train.methods.catalog`). Before an adapter phase the base it adapts is written to the
run's checkpoint directory, so that a resumed run, QLoRA's 4-bit reload and the final merge all
start from exactly those weights. Each phase's rows come from :func:`lmforge.train.data.phase_rows`;
with ``training.preference.loss`` the fine-tuning phase trains on preference pairs instead
(:mod:`lmforge.train.preference_data`; DPO's reference scored once, before its first step).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.core.workspace import Workspace
from lmforge.model.build import build_model, count_parameters
from lmforge.model.chat import stop_token_ids, template_label
from lmforge.tokenizer.build import load_tokenizer
from lmforge.train import artifacts, parallel, pipeline, tensor_parallel, zero
from lmforge.train import checkpoint as ckpt
from lmforge.train.accel import flash4, fp8, speed
from lmforge.train.data import batch_stream, fixed_batches, phase_rows
from lmforge.train.loop import train_phase
from lmforge.train.methods import catalog as methods
from lmforge.train.preference_data import REFERENCE_FILE, attach_reference, preference_rows

# After each checkpoint, on every rank: (checkpoint root, the checkpoint written or None, {step, phase}).
Publish = Callable[[Path, Path | None, dict[str, Any]], None]


def run_phases(training: TrainingConfig, model_cfg: ModelConfig, ws: Workspace, device: torch.device,
               out: Path | None, run_dir: Path, run_id: str, on_log: Callable[[dict], None] | None,
               finetune_heldout_fraction: float, resume: bool = False, base_adapter: Path | None = None,
               root: Path | None = None, publish: Publish | None = None) -> dict:
    """Train and (on rank 0, ``out`` set) save; return ``{"history", "metrics", "params", "resumed_from_step"}``.

    ``root`` holds the run's checkpoints (default: the workspace's ``checkpoints/<run_id>/``, shared
    by the ranks); given, it is a node's own scratch (:mod:`lmforge.train.ray_checkpoint`), so each
    node's local rank 0 writes the base there. ``publish`` is called on every rank after each
    checkpoint with (root, the checkpoint written or None on other ranks, ``{step, phase}``).

    ``base_adapter`` is the adapter of an unmergeable base (a registered champion trained with prefix
    tuning, say): the fine-tuning phase's adapter starts from its weights instead of fresh ones.

    ``finetune_heldout_fraction`` (``tokenize.finetune_heldout_fraction``) is the share of SFT train
    records held out for validation when the phase tokenizes on the fly (:func:`phase_rows`).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tensor_parallel.check_group(training)  # before any work: the group that exists, not the configured count
    pipeline.check_group(training)
    # A tensor-parallel group, or a pipeline, reads one shard of the batch stream.
    data_rank, data_world = (pipeline if training.parallel.pipeline_parallel > 1 else tensor_parallel).data_rank(training)
    tokenizer = load_tokenizer(ws.tokenizer_dir)
    # Who writes the base beside the checkpoints: rank 0 in a shared root, each node's first rank in its own.
    scratch_writer = (rank if root is None else int(os.environ.get("LOCAL_RANK", "0"))) == 0
    root = root or ckpt.checkpoint_root(ws, run_id)
    saved = _saved_checkpoint(root, training, model_cfg) if resume else None
    resumed_after = resumed_from_step(saved)  # now: the history below grows inside saved.state
    torch.manual_seed(training.seed)
    model = _prepared(build_model(model_cfg, len(tokenizer)), tokenizer, device, training)
    tensor_parallel.check_model(training, model.config)  # a base_model's heads are known only now
    history: list[dict] = saved.state["history"] if saved else []
    metrics: dict[str, float] = dict(saved.state["metrics"]) if saved else {}
    # The chat template the model is trained on (saved with its tokenizer) goes on record with the run.
    params: dict[str, Any] = {"params_total": count_parameters(model), "world_size": world,
                              "strategy": training.parallel.strategy,
                              "mesh": {"data_parallel_shard": data_world, "tensor_parallel": tensor_parallel.degree(training),
                                       "pipeline_parallel": pipeline.degree(training)},
                              "chat_template": template_label(tokenizer)}
    phases = [("pretrain", training.pretrain, "pretrain")]
    if training.method != "pretrain":
        phases.append(("finetune", training.finetune, training.method))
    method = "pretrain"
    for index, (name, phase, phase_method) in enumerate(phases):
        if phase.steps == 0 or (saved and index < saved.state["phase_index"]):
            continue
        here = saved if saved and saved.state["phase_index"] == index else None
        method = phase_method
        if methods.method_info(method).adapts:
            model = _adapted(model, tokenizer, training, root / "base", device, resumed=here is not None,
                             writer=scratch_writer, base_adapter=base_adapter)
        params[f"params_trainable_{name}"] = count_parameters(model, trainable_only=True)
        pairs = name == "finetune" and training.preference_tuning
        train_rows, val_rows, params[f"data_{name}"] = (preference_rows if pairs else phase_rows)(
            name, tokenizer, ws, phase, finetune_heldout_fraction)
        if pairs and training.preference.loss == "dpo":
            scored = attach_reference(model, {"train": train_rows, **({"validation": val_rows} if val_rows else {})},
                                      phase.batch_size, device, root / REFERENCE_FILE if training.checkpointing.enabled
                                      else None, resumed=here is not None)
            train_rows, val_rows = scored["train"], scored.get("validation")
        params[f"data_{name}_validation_rows"] = len(val_rows["input_ids"]) if val_rows else 0
        batches = batch_stream(train_rows, phase.batch_size, seed=training.seed + index, rank=data_rank,
                               world_size=data_world, skip=here.state["loop"]["step"] * phase.grad_accum if here else 0)
        val = fixed_batches(val_rows, phase.batch_size, training.validation.batches, rank=data_rank,
                            world_size=data_world) if val_rows else []

        # Defaults bind this phase's values now (the closure outlives the loop iteration).
        def save(step: int, tensors: dict, loop_state: dict, index=index, name=name,
                 before=list(history), done=dict(metrics)):  # noqa: B006 - snapshots taken at definition, on purpose
            # Every rank: a full checkpoint is rank 0's, a sharded one (fsdp) every rank's part (None where none).
            state = {"phase_index": index, "phase": name, "loop": loop_state, "history": before, "metrics": done,
                     "params": params, "identity": _identity(training, model_cfg)}
            written = ckpt.save(root, f"{name}-{step:07d}", tensors, state, training.checkpointing.keep,
                                writer=scratch_writer)
            if publish is not None:
                publish(root, written, {"step": _last_step(before) + step, "phase": name})
            return written

        phase_history, phase_metrics = train_phase(
            model, name, phase, training, batches, val, device, on_log=on_log,
            step_offset=_last_step(history), save=save if training.checkpointing.enabled else None, resume=here)
        history += phase_history
        metrics.update(phase_metrics)
        params[f"param_bytes_per_worker_{name}"] = zero.local_parameter_bytes(model)  # its shards under fsdp, ZeRO-3
        # The next phase, the base it adapts and the saved model start from plain weights (shards gathered).
        if parallel.sharding(training) or zero.enabled(training) or pipeline.degree(training) > 1:
            model = _unsharded(model, method, tokenizer, training, model_cfg, root / "base", device)
    if device.type == "cuda":
        params["peak_memory_per_worker_bytes"] = torch.cuda.max_memory_allocated(device)
    if out is not None:
        # Back to the layers, attention and dtypes that transformers saves and serves (after fp8, fa4, bf16 residual).
        fp8.restore_layout(model)
        flash4.restore(model)
        speed.restore_residual(model)
        _save_outputs(model, tokenizer, methods.method_info(method), root / "base", out, run_dir)
    return {"history": history, "metrics": metrics, "params": params, "resumed_from_step": resumed_after}


def resumed_from_step(saved: ckpt.Checkpoint | None) -> int:
    """The run's step (counted across phases, as history is) that a checkpoint resumes after; 0 for none."""
    return _last_step(saved.state["history"]) + saved.state["loop"]["step"] if saved else 0


def _last_step(history: list[dict]) -> int:
    return int(history[-1]["step"]) if history else 0


def _prepared(model, tokenizer, device: torch.device, training: TrainingConfig):
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    # Generation (the save probe, and serving, which reads these ids) also stops at the template's end of turn.
    stops = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else tokenizer.eos_token_id
    model.to(device)
    speed.apply_settings(model, training.speed, device)
    return model


def _unsharded(sharded, method: str, tokenizer, training: TrainingConfig, model_cfg: ModelConfig, base_dir: Path,
               device: torch.device):
    """A plain copy of a model FSDP2 sharded (:mod:`lmforge.train.parallel`), on every rank: built as the
    phase's model was (the base reloaded and the method applied, for adapters), then given the gathered weights."""
    # FSDP2's shards, ZeRO's partitions or the pipeline's stages gathered.
    full = pipeline.full_model_state(sharded, training) if pipeline.degree(training) > 1 else zero.full_model_state(sharded)
    # The new model's random initialization (overwritten below) must not move the generators: the next
    # phase's fresh weights (LoRA's A matrices, say) are then drawn as an unsharded run draws them.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if methods.method_info(method).adapts:
            model = _adapted(None, tokenizer, training, base_dir, device, resumed=True, writer=False)
        else:
            model = _prepared(build_model(model_cfg, len(tokenizer)), tokenizer, device, training)
    model.load_state_dict(full)
    return model


def _adapted(model, tokenizer, training: TrainingConfig, base_dir: Path, device: torch.device, resumed: bool,
             writer: bool, base_adapter: Path | None = None):
    """The fine-tuning model: the method applied to the base, which is saved first (or reloaded)."""
    if resumed:
        from transformers import AutoModelForCausalLM

        model = _prepared(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True),
                          tokenizer, device, training)
    elif writer:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        artifacts.save_base(model, tokenizer, base_dir)
    if dist.is_initialized():
        dist.barrier()  # QLoRA reloads the base on every rank
    model = methods.apply_method(model, training, base_dir, device)
    if base_adapter is not None and not resumed:  # a resumed run's checkpoint holds the adapter already
        artifacts.load_adapter_weights(model, base_adapter)
    if training.method == "qlora":  # a new model (the base reloaded in 4 bits): prepare it as the base was
        speed.apply_settings(model, training.speed, device)
    llama_adapter = training.method == "adapter" and training.adapter.variant == "llama_adapter"
    if device.type == "cuda" and training.method in speed.BF16_FROZEN_METHODS and not llama_adapter:
        speed.freeze_to_bf16(model)
    return model


def _save_outputs(model, tokenizer, info: methods.MethodInfo, base_dir: Path, out: Path, run_dir: Path) -> None:
    if not info.adapts:
        artifacts.save_full(model, tokenizer, out)
    elif info.mergeable:
        shutil.copytree(base_dir, out / "base")
        artifacts.save_merged(model, tokenizer, out, run_dir)
    else:
        artifacts.save_unmerged(model, tokenizer, out, run_dir, base_dir)


def _saved_checkpoint(root: Path, training: TrainingConfig, model_cfg: ModelConfig) -> ckpt.Checkpoint:
    saved = ckpt.load_latest(root)
    if saved is None:
        raise ConfigError(f"no checkpoint to resume from in {root}",
                          "resume a run that wrote checkpoints (training.checkpointing.every > 0), or start anew")
    if saved.state["identity"] != _identity(training, model_cfg):
        raise ConfigError(f"the checkpoint in {root} was written with another model, training method or "
                          "training.speed.fp8", "resume with the model section, training.method (and its settings) "
                          "and training.speed.fp8 of that run")
    return saved


def _identity(training: TrainingConfig, model_cfg: ModelConfig) -> dict:
    """What must not change between a checkpoint and its resumption (learning rates may)."""
    section = {"lora": "lora", "qlora": "lora", "adapter": "adapter", "ia3": "ia3"}.get(training.method, "prompt_learning")
    identity = {"model": model_cfg.model_dump(mode="json"), "method": training.method,
                "method_config": getattr(training, section).model_dump(mode="json"), "seed": training.seed}
    if training.preference_tuning:  # a DPO checkpoint resumed as plain SFT (or ORPO) would train another objective
        identity["preference"] = training.preference.model_dump(mode="json")
    if training.speed.fp8:  # FP8 training checkpoints GPT-2's layers as nn.Linear (transposed): another layout
        identity["fp8"] = True
    return identity
