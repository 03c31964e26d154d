"""A pipeline LoRA run's adapter as the registry holds it, and the fingerprint of the base it was trained on.

The register stage logs the run's unmerged ``adapter/`` as the run's :data:`ADAPTER_ARTIFACT` artifact and tags the
registered version (:data:`TAG_ADAPTER` ``lora``, :data:`TAG_BASE_DIGEST`, :data:`TAG_BASE`); a registry load while
serving (``serving/adapters/sources.py``) reads those. Nothing here imports MLflow: serving runs without it.

A run-time LoRA adds its deltas to whatever weights the server holds, so it only computes what it was trained to
compute over the exact base it was trained on. Over another base, or over the run's own merged ``model/`` (which
already holds the adapter: it would be applied twice), it answers fluently and wrongly, and no shape check notices.
So the logged adapter carries a record of its base (:data:`BASE_FILE`, beside ``adapter_config.json``: one digest per
weight tensor), which a registry load compares with the served model (:func:`compare`) before reading a weight.

A tensor's digest is SHA-256 of its values rounded to bfloat16: a base stored in float32 and served in float32 (CPU)
or bfloat16 (the GPU default) has the same digests, so the check needs no tolerance. A model that differs from the base
by less than bfloat16 resolution in every weight passes, and in bfloat16 it is that base. Tensors the served model
holds in another form (quantized layers, float16) cannot be compared and are skipped; some must remain.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch
from torch import nn

from lmforge.core.errors import DataError

BASE_FILE = "lmforge_base.json"
ADAPTER_ARTIFACT = "adapter"  # the run artifact that holds the unmerged adapter (peft files + BASE_FILE)
TAG_ADAPTER = "lmforge.adapter"  # the run's adapter kind: lora (logged, loadable at run time), ia3, prefix, ...
TAG_BASE = "lmforge.adapter_base"  # where the base came from (model.base_model, or the run's own base/)
TAG_BASE_DIGEST = "lmforge.adapter_base_digest"  # fingerprint_digest of the base's weights
RECORD_FORMAT = 1
# Served dtypes whose rounding to bfloat16 gives what the stored float32 base rounds to (float16 does not).
_COMPARABLE = (torch.float32, torch.float64, torch.bfloat16)
_RECORD_MAX_BYTES = 16 * 1024 * 1024  # a few hundred lines for the largest models; a record comes from a download
_served: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple[int, ...], str]]] = weakref.WeakKeyDictionary()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of ``tensor``'s values rounded to bfloat16 (see the module docstring)."""
    flat = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def dir_fingerprint(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, digest) of every floating-point tensor in ``model_dir``'s safetensors files, one at a time."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no .safetensors weights to fingerprint")
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is no mapping: keys() is its API
                tensor = weights.get_tensor(name)
                if tensor.is_floating_point():
                    found[name] = (tuple(tensor.shape), tensor_digest(tensor))
    return found


def fingerprint_digest(fingerprint: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """One digest for a whole fingerprint (the registered version's ``lmforge.adapter_base_digest`` tag)."""
    lines = "".join(f"{name}\t{list(shape)}\t{digest}\n" for name, (shape, digest) in sorted(fingerprint.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_base_record(base_dir: Path, out_file: Path, base: str) -> str:
    """Write the record of ``base_dir``'s weights to ``out_file``, naming the base as ``base``; its overall digest."""
    fingerprint = dir_fingerprint(base_dir)
    digest = fingerprint_digest(fingerprint)
    record = {"format": RECORD_FORMAT, "base": base, "digest": digest,
              "tensors": {name: {"shape": list(shape), "digest": d} for name, (shape, d) in sorted(fingerprint.items())}}
    out_file.write_text(json.dumps(record, indent=1))
    return digest


def served_fingerprint(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, digest) of the served model's comparable tensors; computed once per model (it reads every
    weight: seconds for a model of billions of parameters)."""
    cached = _served.get(model)
    if cached is None:
        cached = {name: (tuple(t.shape), tensor_digest(t)) for name, t in model.state_dict().items()
                  if t.dtype in _COMPARABLE}
        _served[model] = cached
    return cached


def read_base_record(record_file: Path) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
    """The base named in a record written by :func:`write_base_record`, and its fingerprint; :class:`DataError` if
    the file is no such record (it comes from a download)."""
    fix = "register the run again (the register stage writes the record)"
    if record_file.stat().st_size > _RECORD_MAX_BYTES:
        raise DataError(f"{record_file} is larger than any base record", fix)
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        tensors = {str(name): (tuple(int(n) for n in t["shape"]), str(t["digest"])) for name, t in record["tensors"].items()}
        return str(record["base"]), tensors
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{record_file} is no readable base record ({exc!r})", fix) from exc


def compare(expected: dict[str, tuple[tuple[int, ...], str]], model: nn.Module) -> tuple[list[str], list[str]]:
    """(compared, differing): the tensors of ``expected`` that ``model`` holds in a comparable form (same name and
    shape, a dtype of :data:`_COMPARABLE`), and those of them whose values differ."""
    served = served_fingerprint(model)
    compared = [name for name, (shape, _d) in expected.items() if name in served and served[name][0] == shape]
    return compared, [name for name in compared if served[name][1] != expected[name][1]]
