"""Sharded checkpoints of FSDP2 runs: each worker writes only its own shards, any layout reads them back.

A run with ``training.parallel.strategy: fsdp`` (:func:`lmforge.train.checkpoint.sharded`) would have
to gather every full tensor to write a full checkpoint, which a model that fits no single worker
cannot afford. Its checkpoints keep the trainable weights and the optimizer state as they lie, through
``torch.distributed.checkpoint`` (DCP): :func:`state` takes them with ``get_state_dict`` (DTensors keyed
by parameter name), :func:`write` has each rank save its shards to a ``dcp/`` directory inside the
checkpoint, and :func:`load` reads them into whatever this run's layout is (FSDP2 over another
number of workers, or plain tensors under DDP or one worker): DCP re-shards on load, each rank reading
only the pieces of the files it needs, then ``set_state_dict`` puts them in place.

DCP writes through its Hugging Face storage: safetensors files, one per rank (``shard-<rank+1>-...``),
each holding the offsets of its pieces in the file's JSON header. So, like the rest of our checkpoints,
nothing is pickled (DCP's default storage pickles its ``.metadata`` file), and which file a rank wrote
is known by name (:func:`rank_files`), which is what Ray Train needs: each rank reports its own files
and Ray merges them into one checkpoint directory (:mod:`lmforge.train.ray_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.core.errors import ConfigError

DCP_DIR = "dcp"  # inside a checkpoint's <phase>-<step>/ directory
MODEL, OPTIMIZER = "model.", "optimizer."  # key prefixes of the one flat state saved


def state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's view of the trainable weights and their optimizer state, flat: ``model.<name>`` and
    ``optimizer.<name>.<key>`` (``exp_avg``, ``exp_avg_sq``, ``step``); DTensors where the run shards.

    Frozen weights are left out (they come from the base, as in full checkpoints); the optimizer's
    param_groups too (settings of this run, its learning rates rebased by the loop on resume)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return _flat(model, *get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True)))


def _flat(model: torch.nn.Module, weights: Mapping[str, Any], optim: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # A tied weight (the output layer sharing the embeddings) is one parameter under two names in the
    # state dict: kept once, by the name named_parameters gives it, as full checkpoints keep it.
    names = {_clean(name) for name, p in model.named_parameters() if p.requires_grad}
    flat = {MODEL + name: tensor for name, tensor in weights.items() if name in names}
    for name, entries in optim["state"].items():
        flat.update({f"{OPTIMIZER}{name}.{key}": value for key, value in entries.items()})
    return flat


def write(flat: dict[str, torch.Tensor], path: Path) -> None:
    """Every rank: save ``flat`` (:func:`state`) to ``path``, each rank its own shards (replicated tensors
    once, by rank 0). Collective; when it returns on any rank, every rank's file is complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))
    if dist.is_initialized():
        dist.barrier()  # no rank moves (or renames the directory) before the last one's file is on disk


def rank_files(path: Path, rank: int) -> list[Path]:
    """The files rank ``rank`` wrote in ``path`` (a :func:`write` directory)."""
    return sorted(path.glob(f"shard-{rank + 1:05d}-*.safetensors"))


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank: fill ``model``'s trainable weights and ``optimizer``'s state from the checkpoint at
    ``path``, re-sharded to this run's layout. A checkpoint of another model fails before any weight changes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"the sharded checkpoint {path.parent} holds no weights ({path} is missing or empty)",
                          "resume from a complete checkpoint (an earlier one, or the run's store copy), or start anew")
    # An optimizer before its first step has no state: get_state_dict makes it (a step of zero
    # gradients at learning rate 0, which changes no weight), so that DCP has tensors to fill.
    options = StateDictOptions(ignore_frozen_params=True)
    weights, optim = get_state_dict(model, optimizer, options=options)
    flat = _flat(model, weights, optim)
    reader = HuggingFaceStorageReader(str(path))
    check_fits(flat, {key: tuple(meta.size) for key, meta in reader.read_metadata().state_dict_metadata.items()
                      if isinstance(meta, TensorStorageMetadata)}, path.parent)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
    loaded: dict[str, Any] = {name: flat[MODEL + name] for name in weights if MODEL + name in flat}
    entries: dict[str, dict[str, Any]] = optim["state"]  # type: ignore[assignment]  # AdamW's: tensors by name
    optim["state"] = {name: {key: flat[f"{OPTIMIZER}{name}.{key}"] for key in keys} for name, keys in entries.items()}
    set_state_dict(model, optimizer, model_state_dict=loaded, optim_state_dict=optim,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _clean(name: str) -> str:
    """A parameter's name as get_state_dict gives it: without the wrappers compile and activation checkpointing add."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def check_fits(wanted: dict[str, torch.Tensor], saved: dict[str, tuple[int, ...]], where: Path) -> None:
    """A :class:`ConfigError` naming what differs when the checkpoint's tensors (global shapes) are not
    this model's: missing or unexpected names, or another shape."""
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shapes = [f"{k} {tuple(saved[k])} != {tuple(t.shape)}" for k, t in wanted.items()
              if k in saved and tuple(saved[k]) != tuple(t.shape)]
    if missing or extra or shapes:
        raise ConfigError(f"the sharded checkpoint {where} does not fit this model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}, other shapes {shapes[:3]})",
                          "resume with the model section and training.method (and its settings) of the run "
                          "that wrote it")
