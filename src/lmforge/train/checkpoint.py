"""Atomic training checkpoints that resume a run exactly, written without pickle.

A checkpoint is a directory ``<root>/<phase>-<step>/`` holding the trainable weights, the optimizer
state, the learning-rate schedule, every random generator's state and the data position (steps
done), plus the run's history so far. Tensors go to safetensors files, everything else to
``state.json``; nothing is ever unpickled. Each one is written into a temporary directory and
renamed into place, and ``latest.json`` is replaced atomically after it, so a crash at any moment
leaves the previous checkpoint intact and named. A run's checkpoints live in
``LMFORGE_HOME/checkpoints/<run_id>/``; ``python -m lmforge.train CONFIG --resume RUN_ID`` resumes.

Two formats, named by ``state.json``'s ``format`` (a checkpoint without it is ``full``): ``full`` holds
full tensors, written by rank 0 (a DDP run's, one worker's, a tensor-parallel run's, gathered);
``sharded`` (FSDP2 runs, :func:`sharded`) keeps the trainable weights and optimizer state in a ``dcp/``
directory where each rank wrote only its shards (:mod:`lmforge.train.sharded_checkpoint`), beside rank
0's ``state.json`` and generator states. Both load into any layout: :func:`restore` picks the path by
the format, so a run resumes on another number of workers and with another strategy.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.core.errors import ConfigError
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.train import sharded_checkpoint
from lmforge.train.parallel import full_state, local_shard, sharding

if TYPE_CHECKING:
    from lmforge.config.training import TrainingConfig

LATEST = "latest.json"
FULL, SHARDED = "full", "sharded"  # state.json's format: how the weights and optimizer state are stored
SHARDS = "shards"  # the tensor group a sharded checkpoint writes through DCP (every rank its own part)


def checkpoint_root(ws: Workspace, run_id: str) -> Path:
    return ws.checkpoints_dir / run_id


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensor groups by file stem, and the JSON state."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.state.get("format", FULL) == SHARDED


def writes_sharded(training: TrainingConfig) -> bool:
    """Whether this run's checkpoints are sharded: FSDP2 (alone or over a tensor-parallel mesh), in a process group.
    A tensor-parallel group without FSDP2 keeps full checkpoints (its shards are a few copies, not a fraction)."""
    return training.parallel.strategy == "fsdp" and sharding(training)


def save(root: Path, tag: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
         keep: int, writer: bool | None = None) -> Path | None:
    """Write one checkpoint atomically, point ``latest.json`` at it, drop all but the newest ``keep``; return
    its path on the ranks that wrote part of it (None on the others).

    Called on every rank of a process group. A full checkpoint is rank 0's alone; a sharded one (a
    :data:`SHARDS` group in ``tensors``) is written by all (:func:`save_sharded`), and ``writer`` (default:
    rank 0) is the rank that makes and renames the directory: each node's first rank where ``root`` is
    a node's own scratch."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if SHARDS in tensors:
        return save_sharded(root, tag, tensors, state, keep, rank == 0 if writer is None else writer)
    if rank != 0:
        return None
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{tag}.", suffix=".tmp"))
    try:
        for stem, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{stem}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "format": FULL}, default=_jsonable))
        _sync(tmp)
        _commit(root, tag, tmp, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / tag


def save_sharded(root: Path, tag: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                 keep: int, writer: bool) -> Path | None:
    """Every rank writes its shards (the :data:`SHARDS` group) into one temporary directory per node, rank 0
    also the rest (generators, best weights, ``state.json``); after a barrier ``writer`` renames it into
    place. A crash before the rename leaves the previous checkpoint named in ``latest.json``."""
    from safetensors.torch import save_file

    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = root / f".{tag}.sharded.tmp"  # one name all ranks of the node agree on
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed attempt left
        tmp.mkdir(parents=True)
    _barrier()
    try:
        sharded_checkpoint.write(tensors[SHARDS], tmp / sharded_checkpoint.DCP_DIR)  # collective, ends in a barrier
        if rank == 0:
            for stem, group in tensors.items():
                if stem != SHARDS:
                    save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{stem}.safetensors"))
            (tmp / "state.json").write_text(json.dumps({**state, "format": SHARDED}, default=_jsonable))
            _sync(tmp)
        _barrier()
        if writer:
            _commit(root, tag, tmp, keep)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()  # the directory has its final name before any rank reports it
    final = root / tag
    return final if rank == 0 or sharded_checkpoint.rank_files(final / sharded_checkpoint.DCP_DIR, rank) else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sync(directory: Path) -> None:
    for path in directory.iterdir():  # durable before the rename makes them visible
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _commit(root: Path, tag: str, tmp: Path, keep: int) -> None:
    """Rename the complete ``tmp`` to ``root/tag``, point ``latest.json`` at it, drop all but the newest ``keep``."""
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    previous = _read_latest(root).get("history", [])
    history = [t for t in previous if t != tag] + [tag]
    atomic_write_json(root / LATEST, {"tag": tag, "history": history[-keep:]})
    for old in history[:-keep]:
        shutil.rmtree(root / old, ignore_errors=True)


def load_latest(root: Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``root``, or None when there is none."""
    from safetensors.torch import load_file

    tag = _read_latest(root).get("tag")
    if not tag:
        return None
    path = root / tag
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    return Checkpoint(path, tensors, json.loads((path / "state.json").read_text()))


def _read_latest(root: Path) -> dict:
    path = root / LATEST
    return json.loads(path.read_text()) if path.exists() else {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


# ---------------------------------------------------------------- what goes in


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            shards: bool) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensor groups, their JSON side: ``optimizer``, ``rng``) of the weights being trained, the optimizer
    and the generators, for :func:`save`. Every rank calls it: a full checkpoint gathers sharded tensors
    (collective, kept by rank 0 only); with ``shards`` (:func:`writes_sharded`) each rank keeps its own."""
    rng_tensors, rng_meta = rng_state()
    if shards:
        return {SHARDS: sharded_checkpoint.state(model, optimizer), "rng": rng_tensors}, {"optimizer": {}, "rng": rng_meta}
    opt_tensors, opt_meta = optimizer_state(optimizer)
    keep = not dist.is_initialized() or dist.get_rank() == 0
    groups = {"model": full_state(trainable_state(model), keep), "optimizer": full_state(opt_tensors, keep),
              "rng": rng_tensors}
    return groups, {"optimizer": opt_meta, "rng": rng_meta}


def restore(saved: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer state and generators from ``saved`` (its ``loop`` state holds the JSON side),
    whichever format it has and whatever this run's layout: full tensors are cut to this rank's shards,
    sharded ones re-sharded by DCP. Every rank calls it."""
    loop = saved.state["loop"]
    if saved.sharded:
        sharded_checkpoint.load(model, optimizer, saved.path / sharded_checkpoint.DCP_DIR)
    else:
        load_trainable(model, saved.tensors["model"])
        load_optimizer(optimizer, saved.tensors["optimizer"], loop["optimizer"])
    set_rng_state(saved.tensors["rng"], loop["rng"])



def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters being trained, by name (frozen weights are restored from the base, not stored)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = trainable_state(model)
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ConfigError(f"the checkpoint's weights do not fit this model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})",
                          "resume with the same model and training.method as the run that wrote it")
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(p.shape)}" for k, p in expected.items() if state[k].shape != p.shape]
    if shapes:
        raise ConfigError(f"the checkpoint's weights do not fit this model (other shapes: {shapes[:3]})",
                          "resume with the same model and training.method as the run that wrote it")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(local_shard(state[name], param))  # a sharded run's checkpoint holds full tensors


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of an optimizer's state_dict, split so that neither needs pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    # A compiled step's learning rate is a tensor (filled by the schedule): stored as a number.
    groups = [{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


_IMPLEMENTATION = ("fused", "foreach", "capturable")  # AdamW flags that pick its kernels


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the order state indices count in
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        # Full tensors (as written) cut to this worker's shards where the parameters are sharded (FSDP2).
        full = isinstance(value, torch.Tensor) and value.shape == params[int(index)].shape
        state.setdefault(int(index), {})[key] = local_shard(value, params[int(index)]) if full else value
    current = optimizer.param_groups
    groups = []
    for i, saved in enumerate(meta["param_groups"]):
        group = {**saved, "betas": tuple(saved["betas"])} if "betas" in saved else dict(saved)
        # How the step runs is this run's choice (training.speed.compile_optimizer may have changed since
        # the checkpoint); torch also places the step counts by these flags while loading.
        now = current[i] if i < len(current) else {}
        group.update({k: now[k] for k in _IMPLEMENTATION if k in now})
        groups.append(group)
    as_tensors = [{k: v.device for k, v in g.items() if isinstance(v, torch.Tensor)} for g in current]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for group, devices in zip(optimizer.param_groups, as_tensors):  # tensors again where they were (compiled step)
        for key, device in devices.items():
            if key in group:
                group[key] = torch.tensor(group[key], device=device)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": random.getstate()}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
