"""Several unmerged LoRA adapters over one base model, chosen per request (the paged engine).

``serving.adapters`` (``lmforge serve BASE --adapter NAME=DIR``) names LoRA adapters that run
next to the plain base: a request whose ``model`` is NAME is decoded with that adapter, in the same
batch as requests for the base or for other adapters. Each adapted linear layer adds, per token,
``scale_i * (x @ A_i) @ B_i`` for the adapter ``i`` of the token's sequence (the idea of
Punica/S-LoRA's BGMV, in plain torch).

How: every adapted layer group of the runner (fused QKV, O, fused gate/up, down) gets two stacks,
``A_all [in, n*R]`` and ``B_all [n*R, out]``: adapter ``j`` owns columns ``j*R .. (j+1)*R`` of
``A_all`` (its q, k and v ``A`` side by side, each padded to the largest rank any adapter uses for
that module) and the same rows of ``B_all``, where its ``B`` (times its scale) sits at the output
columns of its module inside the fused output, so the deltas land in the right slices. A step
computes ``x @ A_all`` for every token, zeroes the columns of the adapters the token does not use
(a per-token mask from the token's cache row, see below), and adds ``@ B_all``. Every shape depends
only on the number of tokens, so decode steps captured as CUDA graphs and prefill chunks run the
same code. The extra work per token is ``n * R * (in + out)`` multiply-adds per group: small next to
the base for a handful of adapters; many adapters would want a gathering kernel instead.

Which adapter a token uses comes from ``row_slot``, a device tensor indexed by the token's cache
row (the same row the block table uses): the scheduler sets a row's slot when it admits a request
(0 = the base, 1..n = the adapters) and the scratch row of padded graph rows stays 0, so a captured
graph reads the current slots without any new input.

Which adapter sits in which slot is ``adapters/runtime.py``'s: start-up adapters get one slot each, exactly
as wide as they need; with ``serving.lora.max_loras`` the slots are ``serving.lora.max_rank`` wide on every
module of ``serving.lora.target_modules``, and adapters loaded while serving are written into them in place
(:meth:`LoraSlots.write`), so the tensors a captured graph reads stay the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from lmforge.core.errors import DataError, ServingError
from lmforge.serving.model.runner import LlamaRunner
from lmforge.serving.model.types import LlamaCausalLM
from lmforge.tracking.adapter_base import BASE_FILE, compare, read_base_record
from lmforge.train.artifacts import marked_adapter_dir

# The runner's fused layer groups and the model modules each one runs, in output order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_MERGE_FIX = ("serve it merged on its own instead: `lmforge serve RUN/model` (lmforge merges lora, qlora and "
              "ia3 adapters into model/ at save), or merge it with peft's merge_and_unload()")


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter read from disk: per (layer, module), ``A [r, in]`` and ``scale * B [out, r]``."""

    name: str
    path: Path
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def find_adapter_dir(path: Path) -> Path:
    """The peft adapter directory inside ``path``: itself, an lmforge run's ``adapter/``, or the one a
    model directory's adapter marker names (``lmforge.train.artifacts.marked_adapter_dir``)."""
    path = Path(path).expanduser()
    candidates = [path, path / "adapter"]
    marked = marked_adapter_dir(path)
    if marked is not None:
        candidates.insert(0, marked)
    for candidate in candidates:
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ServingError(f"{path} holds no adapter (no adapter_config.json in it or in {path / 'adapter'})",
                       "pass a peft LoRA adapter directory or the directory of an lmforge LoRA training run")


def read_adapter(name: str, path: Path, model: LlamaCausalLM, source: str | None = None) -> LoraAdapter:
    """Read and check the LoRA adapter in ``path`` against the served base ``model``: its shapes, and its base's
    weights where it records them (:func:`check_base`). ``source``: what the client named (default ``path``)."""
    adapter_dir = find_adapter_dir(path)
    check_base(adapter_dir, model, source or str(path))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    _check_config(name, adapter_dir, config)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ServingError(f"adapter {name!r}: {adapter_dir} has no adapter_model.safetensors (pickled weights "
                           "are never loaded: they could run code)", "save the adapter with safetensors "
                           "(peft's save_pretrained does by default)")
    from safetensors.torch import load_file

    tensors = load_file(str(weights_file))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = _KEY.search(key)
        if found is None or found.group(2) not in _PARENT:
            raise ServingError(f"adapter {name!r} adapts {key!r}; unmerged serving applies LoRA to the q/k/v/o and "
                               "gate/up/down projections of the decoder layers only", _MERGE_FIX)
        pairs.setdefault((int(found.group(1)), found.group(2)), {})[found.group(3)] = tensor
    weights = {}
    for (layer, module), pair in sorted(pairs.items()):
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or a.shape[0] != b.shape[1]:
            raise ServingError(f"adapter {name!r}: layer {layer} {module} lacks a matching lora_A/lora_B pair",
                               "re-save the adapter with peft's save_pretrained")
        _check_shape(name, model, layer, module, a, b, config)
        rank = a.shape[0]
        scale = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
        weights[(layer, module)] = (a.float(), b.float() * scale)
    return LoraAdapter(name, adapter_dir, weights)


def _check_config(name: str, adapter_dir: Path, config: dict) -> None:
    kind = config.get("peft_type", "unknown")
    refusals = [
        (kind != "LORA", f"is a {kind} adapter; only LoRA adapters are served unmerged next to others"),
        (bool(config.get("use_dora")), "is a DoRA adapter (its magnitude rescales whole weight columns, which "
         "is no per-token add-on)"),
        (config.get("bias", "none") != "none", f"trains biases (bias={config.get('bias')!r})"),
        (bool(config.get("modules_to_save")), f"fully trains {config.get('modules_to_save')}"),
        (bool(config.get("alpha_pattern")), "uses per-module alpha_pattern"),
        (bool(config.get("fan_in_fan_out")), "uses fan_in_fan_out (Conv1D) layers, which Llama has not"),
    ]
    for refused, why in refusals:
        if refused:
            raise ServingError(f"adapter {name!r} ({adapter_dir}) {why}", _MERGE_FIX)


def _check_shape(name: str, model: LlamaCausalLM, layer: int, module: str, a: torch.Tensor, b: torch.Tensor,
                 config: dict) -> None:
    layers = model.model.layers
    base = config.get("base_model_name_or_path") or "unknown"
    fix = f"serve adapter {name!r} over the base it was trained on (its adapter_config.json names {base})"
    if layer >= len(layers):
        raise ServingError(f"adapter {name!r} adapts layer {layer}, but the served base has {len(layers)} layers", fix)
    target = getattr(getattr(layers[layer], _PARENT[module]), module)
    if (a.shape[1], b.shape[0]) != (target.in_features, target.out_features):
        raise ServingError(f"adapter {name!r} does not fit the served base: layer {layer} {module} maps "
                           f"{a.shape[1]} -> {b.shape[0]} features in the adapter but {target.in_features} -> "
                           f"{target.out_features} in the base", fix)


@dataclass
class _Stack:
    a: torch.Tensor  # [in, n * rank]
    b: torch.Tensor  # [n * rank, out of the fused group]
    rank: int  # R: columns per adapter
    widths: tuple[int, ...]  # each module's share of R (its largest rank), in GROUPS order
    outs: tuple[int, ...]  # each module's output features inside the fused output


def widest_ranks(adapters: list[LoraAdapter]) -> dict[tuple[int, str], int]:
    """Per (layer, module), the largest rank any of ``adapters`` uses there: slots exactly as wide as they need."""
    ranks: dict[tuple[int, str], int] = {}
    for adapter in adapters:
        for key, (a, _b) in adapter.weights.items():
            ranks[key] = max(ranks.get(key, 0), a.shape[0])
    return ranks


class LoraSlots:
    """``count`` device slots of stacked adapter weights (``ranks`` wide per layer and module), and each cache
    row's slot. The stacks are written in place (:meth:`write`), so captured CUDA graphs stay valid."""

    def __init__(self, ranks: Mapping[tuple[int, str], int], count: int, model: LlamaCausalLM, max_rows: int) -> None:
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.count = count
        # One entry per cache row plus the scratch row of padded graph rows, which stays 0 (the base).
        self.row_slot = torch.zeros(max_rows + 1, dtype=torch.long, device=self.device)
        self._ids = torch.arange(1, self.count + 1, device=self.device)
        self.mask = torch.zeros((0, self.count), dtype=self.dtype, device=self.device)
        self.stacks: dict[tuple[int, str], _Stack] = {}
        for index, layer in enumerate(model.model.layers):
            for group, modules in GROUPS.items():
                widths = tuple(ranks.get((index, m), 0) for m in modules)
                if sum(widths):
                    targets = [getattr(getattr(layer, _PARENT[m]), m) for m in modules]
                    outs = tuple(t.out_features for t in targets)
                    total = sum(widths)
                    a = torch.zeros(targets[0].in_features, count * total, device=self.device, dtype=self.dtype)
                    b = torch.zeros(count * total, sum(outs), device=self.device, dtype=self.dtype)
                    self.stacks[(index, group)] = _Stack(a, b, total, widths, outs)

    def misfit(self, adapter: LoraAdapter) -> str | None:
        """Why ``adapter`` cannot sit in these slots (a module they do not adapt, or a larger rank), else None."""
        for (layer, module), (a, _b) in sorted(adapter.weights.items()):
            group = next(g for g, modules in GROUPS.items() if module in modules)
            stack = self.stacks.get((layer, group))
            width = stack.widths[GROUPS[group].index(module)] if stack is not None else 0
            if a.shape[0] > width:
                return (f"adapter {adapter.name!r} has rank {a.shape[0]} at layer {layer} {module}, where the "
                        f"served slots hold rank {width}")
        return None

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        """Put ``adapter`` into ``slot`` (1..count), overwriting whatever was there (checked by :meth:`misfit`)."""
        for (layer, group), stack in self.stacks.items():
            col = (slot - 1) * stack.rank
            stack.a[:, col : col + stack.rank].zero_()
            stack.b[col : col + stack.rank].zero_()
            out = 0
            for module, width, features in zip(GROUPS[group], stack.widths, stack.outs):
                if (layer, module) in adapter.weights:
                    a, b = adapter.weights[(layer, module)]
                    r = a.shape[0]  # a smaller rank leaves zero padding up to the module's width
                    stack.a[:, col : col + r].copy_(a.t())
                    stack.b[col : col + r, out : out + features].copy_(b.t())
                col, out = col + width, out + features

    def set_row(self, row: int, slot: int) -> None:
        """Decode cache row ``row`` with adapter ``slot`` (0: the base) from now on."""
        self.row_slot[row] = slot

    def select(self, rows: torch.Tensor) -> None:
        """Per-token adapter mask ``[T, n]`` for the step whose tokens sit in cache ``rows`` ([T])."""
        self.mask = (self.row_slot[rows][:, None] == self._ids).to(self.dtype)

    def wrap(self, layer: int, group: str,
             base: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``base`` (a fused linear of the runner) plus this group's adapter deltas, or ``base`` itself."""
        stack = self.stacks.get((layer, group))
        if stack is None:
            return base

        def adapted(x: torch.Tensor) -> torch.Tensor:
            h = (x @ stack.a).view(-1, self.count, stack.rank) * self.mask[:, :, None]
            return torch.addmm(base(x), h.view(-1, self.count * stack.rank), stack.b)

        return adapted


def attach(slots: LoraSlots, runner: LlamaRunner) -> None:
    """Make ``runner`` add the adapters' deltas to its fused layers."""
    for index, layer in enumerate(runner.layers):
        for group in GROUPS:
            setattr(layer, group, slots.wrap(index, group, getattr(layer, group)))
    runner.lora = slots


def check_base(adapter_dir: Path, model: LlamaCausalLM, lora_path: str) -> None:
    """Refuse (:class:`ServingError`) the adapter in ``adapter_dir`` (loaded as ``lora_path``) when the record of its
    base says it was trained on other weights than ``model``'s (over another base, or over its own merged model, it
    would answer fluently and wrongly). An adapter without a record is not checked (its shapes still are)."""
    record_file = Path(adapter_dir) / BASE_FILE
    if not record_file.is_file():
        return
    try:
        base, expected = read_base_record(record_file)
    except DataError as exc:
        raise ServingError(f"lora_path {lora_path!r}: {exc.cause}", exc.fix) from exc
    compared, differ = compare(expected, cast(nn.Module, model))  # a transformers model: a Module with a state_dict
    fix = (f"serve the base this adapter was trained on ({base}) and load it there, or load an adapter trained on "
           "the served model; a server of the run's merged model/ already holds this adapter: call it by the "
           "served name instead")
    if not compared:
        raise ServingError(f"lora_path {lora_path!r} was trained on {base}, and the served model holds none of that "
                           "base's weights in a form that can be compared (other names, or all quantized)", fix)
    if differ:
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise ServingError(f"lora_path {lora_path!r} was trained on another base than the served model: "
                           f"{len(differ)} of {len(compared)} weight tensors differ ({shown}); it was trained on "
                           f"{base}", fix)
