"""What a training run leaves behind, and how to load it back for inference.

A run directory holds ``model/``: always a complete transformers model directory (config,
safetensors weights, tokenizer, generation config) that evaluation, the registry and serving load.

- ``pretrain``, ``full``: ``model/`` is the trained model.
- Mergeable adapters (``lora``, ``qlora``, ``ia3``): ``adapter/`` (peft format) and the ``base/`` it
  adapts; ``model/`` is the adapter merged into that base, merged from the saved files (float32).
- Adapters that cannot be merged (``adapter``, ``prefix``, ``ptuning_v2``, ``prompt``, ``ptuning``):
  ``model/`` holds the base weights plus the adapter in ``model/adapter/`` and a marker file
  ``lmforge_adapter.json``; :func:`load_trained` applies it. A plain
  ``AutoModelForCausalLM.from_pretrained(model/)`` loads the base only. ``adapter/`` is a copy that
  points at ``model/`` as its base.

Every ``model/`` records ``lmforge_probe.json``: greedy tokens of the in-memory model before saving,
which loading must reproduce.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.workspace import atomic_write_json
from lmforge.model.prompt import format_prompt
from lmforge.train.methods import bottleneck as adapters

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lmforge.model.types import CausalLM

PROBE_FILE = "lmforge_probe.json"
PROBE_INSTRUCTION = "What does `json.dumps` do?"
PROBE_TOKENS = 8
MARKER = "lmforge_adapter.json"
MARKER_MAX_BYTES = 64 * 1024  # a marker is a few lines of JSON
# Weight files peft's loader falls back to when adapter_model.safetensors is absent: pickles, which torch.load runs.
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")


def save_full(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """``out/model``: a model trained in full (or not adapted at all)."""
    probe = greedy_ids(model, tokenizer, format_prompt(PROBE_INSTRUCTION))
    _save_model(model, tokenizer, out / "model")
    _write_probe(out / "model", probe)


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """The exact weights an adapter is about to be trained on (written before training)."""
    _save_model(model, tokenizer, path)


def save_merged(model: PeftModel, tokenizer: PreTrainedTokenizerBase, out: Path, run_dir: Path) -> None:
    """``adapter/`` from the trained peft model, and ``model/`` = that adapter merged into ``base/``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model.peft_config["default"].base_model_name_or_path = str(run_dir / "base")
    # The vocabulary never changes here; "auto" would look the base up on a hub.
    model.save_pretrained(str(out / "adapter"), save_embedding_layers=False)
    probe = greedy_ids(model, tokenizer, format_prompt(PROBE_INSTRUCTION))
    # Merge from the files, in float32: exact even when the base trained in bf16 or 4 bits.
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    _save_model(merged, tokenizer, out / "model")
    _write_probe(out / "model", probe)


def save_unmerged(model: CausalLM, tokenizer: PreTrainedTokenizerBase, out: Path, run_dir: Path,
                  base_dir: Path) -> None:
    """``model/`` = base weights + ``model/adapter/`` + marker; ``adapter/`` beside it."""
    from peft import PeftModel

    probe = greedy_ids(model, tokenizer, format_prompt(PROBE_INSTRUCTION))
    if base_dir.resolve() != (out / "model").resolve():
        shutil.copytree(base_dir, out / "model")
    for target, base_path in ((out / "model" / "adapter", ".."), (out / "adapter", str(run_dir / "model"))):
        if isinstance(model, PeftModel):
            model.peft_config["default"].base_model_name_or_path = base_path
            model.save_pretrained(str(target), save_embedding_layers=False)
        else:  # our bottleneck adapters
            adapters.save_adapter(model, target, base_dir=base_path)
    meta = adapters.adapter_meta(model)
    kind = meta["kind"] if meta is not None else "peft"
    atomic_write_json(out / "model" / MARKER, {
        "adapter": "adapter", "format": kind, "mergeable": False,
        "note": "base weights; apply adapter/ with lmforge.train.artifacts.load_trained (transformers alone "
                "loads the base without it)"})
    _write_probe(out / "model", probe)


def load_trained(model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CausalLM:
    """A trained ``model/`` ready for inference, with its unmergeable adapter applied if it has one."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                local_files_only=True, trust_remote_code=False)
    adapter_dir = marked_adapter_dir(model_dir)
    model = apply_adapter(base, adapter_dir) if adapter_dir is not None else base
    return model.to(device).eval()  # type: ignore[arg-type]  # PreTrainedModel.to wraps Module.to; mypy reads it unbound


def marked_adapter_dir(model_dir: Path) -> Path | None:
    """The unmergeable adapter's directory that ``model_dir``'s marker names, or None without a marker.

    A model directory may come from anyone (a registry, a download), and its marker decides what is
    loaded: the adapter must lie inside ``model_dir`` (no ``..``, absolute path or symlink out) and hold
    its weights as safetensors only (a pickled ``adapter_model.bin`` could run code in ``torch.load``).
    Anything else is a :class:`DataError`, raised before any weight is read.
    """
    root = Path(model_dir).resolve()
    marker = root / MARKER
    if not marker.exists() and not marker.is_symlink():
        return None
    fix = ("serve or load the model/ directory a training run wrote (lmforge_adapter.json names its own adapter/ "
           "subdirectory, with adapter_model.safetensors), or delete lmforge_adapter.json to use the base alone")
    _require_inside(marker, root, marker, fix)
    if not marker.is_file() or marker.stat().st_size > MARKER_MAX_BYTES:
        raise DataError(f"{marker} is not a small JSON file", fix)
    try:
        named = json.loads(marker.read_text(encoding="utf-8")).get("adapter")
    except (ValueError, AttributeError) as exc:  # not JSON, not UTF-8, or not an object
        raise DataError(f"{marker} is not valid JSON holding an object: {exc}", fix) from exc
    if not isinstance(named, str) or not named.strip():
        raise DataError(f"{marker} names no adapter directory (its 'adapter' is {named!r})", fix)
    if Path(named).is_absolute() or ".." in Path(named).parts:
        raise DataError(f"{marker} points outside {root}: {named!r}", fix)
    adapter_dir = _require_inside(root / named, root, marker, fix)
    if not adapter_dir.is_dir():
        raise DataError(f"{marker} names {named!r}, which is not a directory in {root}", fix)
    pickled = [name for name in PICKLED_WEIGHTS if (adapter_dir / name).exists()]
    if pickled:
        raise DataError(f"the adapter in {adapter_dir} holds pickled weights ({', '.join(pickled)}), which are never "
                        "loaded (unpickling can run code)", "save the adapter with safetensors only (peft's "
                        f"save_pretrained does by default) and delete {', '.join(pickled)}")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise DataError(f"the adapter in {adapter_dir} has no adapter_model.safetensors", fix)
    _require_inside(weights, root, marker, fix)
    return adapter_dir


def _require_inside(path: Path, root: Path, marker: Path, fix: str) -> Path:
    """``path`` with its symlinks resolved, if that stays inside ``root``; a DataError naming the marker if not."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"{marker} leads outside {root}: {path} is {resolved}", fix)
    return resolved


def apply_adapter(model: PreTrainedModel, adapter_dir: Path) -> CausalLM:
    """``model`` with the adapter in ``adapter_dir`` applied: one of our bottleneck adapters, else peft's."""
    if adapters.is_bottleneck_adapter(adapter_dir):
        return adapters.load_adapter(model, adapter_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)


@torch.no_grad()
def load_adapter_weights(model: CausalLM, adapter_dir: Path) -> None:
    """Start the adapter just applied to ``model`` from the weights saved in ``adapter_dir`` (continuing a
    registered unmergeable adapter). Every saved tensor must find its twin by name and shape: another
    method or other adapter settings would silently train something else, so they are refused."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if adapters.is_bottleneck_adapter(adapter_dir):
        saved = load_file(str(adapter_dir / adapters.WEIGHTS_FILE))
        own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    else:
        from peft import PeftModel, get_peft_model_state_dict, load_peft_weights

        saved = load_peft_weights(str(adapter_dir), device="cpu")
        own = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else {}
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    if shapes != {k: tuple(v.shape) for k, v in own.items()}:
        raise ConfigError(
            f"the adapter in {adapter_dir} ({adapter_kind(adapter_dir)}) does not fit the one training.method "
            "applies (other tensors or shapes)", "set training.method and its settings (lora, adapter or "
            "prompt_learning section) to those the base's adapter was trained with")
    if adapters.is_bottleneck_adapter(adapter_dir):
        for name, tensor in saved.items():
            own[name].copy_(tensor)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, saved)  # type: ignore[arg-type]  # a PeftModel, checked above


# peft saves the virtual tokens of prefix tuning and p-tuning as they come out of their reparameterization
# network, which it does not keep: what can go on training them is the method that trains them directly.
_CONTINUED_BY = {"PREFIX_TUNING": "ptuning_v2", "PROMPT_TUNING": "prompt", "P_TUNING": "prompt",
                 "ADAPTION_PROMPT": "adapter"}


def continuing_method(adapter_dir: Path) -> str:
    """The ``training.method`` that keeps training the unmergeable adapter saved in ``adapter_dir``."""
    if adapters.is_bottleneck_adapter(adapter_dir):
        return "adapter"
    peft_type = json.loads((Path(adapter_dir) / adapters.CONFIG_FILE).read_text()).get("peft_type")
    return _CONTINUED_BY.get(str(peft_type), str(peft_type).lower())


def adapter_kind(adapter_dir: Path) -> str:
    """What trained the adapter in ``adapter_dir``: peft's ``peft_type`` (PREFIX_TUNING, ...) or our adapters' kind."""
    config = json.loads((Path(adapter_dir) / adapters.CONFIG_FILE).read_text())
    return str(config.get("peft_type") or config.get("kind") or "unknown kind")


@torch.no_grad()
def greedy_ids(model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str,
               max_new_tokens: int = PROBE_TOKENS) -> list[int]:
    """Token ids ``model`` greedily appends to ``prompt`` (the reload check of a saved model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    # Adapted models on GPUs keep a bf16 base beside float32 adapters: autocast reconciles them.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with amp:
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            out = _greedy_by_forward(model, ids, max_new_tokens, tokenizer.eos_token_id)
        else:
            # generate() is GenerationMixin's, which every AutoModelForCausalLM class mixes into
            # PreTrainedModel (the stubs cannot say so); peft's wrapper forwards it.
            generate = cast("Callable[..., torch.Tensor]", model.generate)
            out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return out[0, ids.shape[1]:].tolist()


def _greedy_by_forward(model: CausalLM, ids: torch.Tensor, max_new_tokens: int,
                       eos_token_id: int | None) -> torch.Tensor:
    """Greedy decoding by the full forward at every step, for peft prompt-learning models: peft 0.21's
    ``generate()`` under transformers 5.2x drops a prefix adapter's prefix (the cache now travels as
    ``cache=``, which wins over peft's ``past_key_values=``) and re-injects prompt-tuning embeddings at
    every step (GPT-2 then runs past its position table). The forward is what the adapter trained as."""
    configured = model.generation_config.eos_token_id
    eos = {*(configured if isinstance(configured, (list, tuple)) else [configured]), eos_token_id} - {None}
    for _ in range(max_new_tokens):
        token = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if int(token) in eos:
            break
    return ids


def load_probe(model_dir: Path) -> dict:
    """The greedy completion recorded when ``model_dir`` was saved (see :func:`greedy_ids`)."""
    return json.loads((Path(model_dir) / PROBE_FILE).read_text())


def _save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    model.save_pretrained(path)  # safetensors: transformers 5 writes nothing else
    tokenizer.save_pretrained(path)


def _write_probe(model_dir: Path, completion_ids: list[int]) -> None:
    atomic_write_json(model_dir / PROBE_FILE, {"prompt": format_prompt(PROBE_INSTRUCTION),
                                               "max_new_tokens": PROBE_TOKENS, "completion_ids": completion_ids})
