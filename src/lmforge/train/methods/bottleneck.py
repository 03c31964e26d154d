"""Bottleneck adapters in the style of Houlsby et al. (2019), which peft does not have.

Each chosen output projection (attention output and feed-forward output by default) is followed by
a small residual MLP, ``y + up(act(down(y)))``, whose up-projection starts at zero so the adapted
model starts as exactly the base. Only the adapters (and, as in the paper, the layer norms) train.
Nonlinear adapters cannot be merged into the base weights, so they are saved on their own:
``adapter_config.json`` plus ``adapter_model.safetensors`` (safetensors, like peft's format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KIND = "lmforge-houlsby"
# Output projections of the attention and feed-forward blocks, by architecture family.
DEFAULT_TARGETS = {
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "gpt_neox": ["attention.dense", "mlp.dense_4h_to_h"],
    "default": ["o_proj", "down_proj"],  # llama, mistral, qwen2, gemma, phi3, ...
}
_NORM_WORDS = ("norm", "ln_")
_META = "lmforge_adapter"  # the model attribute where add_adapters records what save_adapter writes


class BottleneckAdapter(torch.nn.Module):
    """``y + up(gelu(down(y)))`` after ``base``; identical to ``base`` at initialization."""

    def __init__(self, base: torch.nn.Module, width: int, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(width, bottleneck)
        self.up = torch.nn.Linear(bottleneck, width)
        torch.nn.init.normal_(self.down.weight, std=1e-2)
        torch.nn.init.zeros_(self.down.bias)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(*args, **kwargs)
        return y + self.up(torch.nn.functional.gelu(self.down(y)))


def add_adapters(model: PreTrainedModel, bottleneck: int, target_modules: list[str] | None = None,
                 train_norms: bool = True) -> list[str]:
    """Wrap ``model``'s target projections in place, freeze the rest; return the wrapped names."""
    targets = target_modules or DEFAULT_TARGETS.get(model.config.model_type, DEFAULT_TARGETS["default"])
    names = [name for name, _ in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        raise ConfigError(
            f"no module of this {model.config.model_type} model matches the adapter targets {targets}",
            "set training.adapter.target_modules to the names of its attention and feed-forward output "
            "projections (see `print(model)`), or use another training.method")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        width = _out_features(base, name)
        setattr(parent, child, BottleneckAdapter(base, width, bottleneck).to(next(base.parameters()).device))
    if train_norms:
        for name, param in model.named_parameters():
            if any(word in name.rsplit(".", 2)[-2].lower() for word in _NORM_WORDS):
                param.requires_grad_(True)
    setattr(model, _META, {"kind": KIND, "bottleneck": bottleneck, "target_modules": names,
                           "train_norms": train_norms})
    return names


def adapter_meta(model: torch.nn.Module) -> dict[str, Any] | None:
    """What :func:`add_adapters` recorded on ``model``; None when it has no bottleneck adapters."""
    return getattr(model, _META, None)


def _out_features(module: torch.nn.Module, name: str) -> int:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):  # GPT-2's transposed linear layer
        return module.nf
    raise ConfigError(f"adapter target {name} is a {type(module).__name__}, not a linear layer",
                      "choose linear output projections in training.adapter.target_modules")


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors: adapters and (when trained) norms, by their names in the model."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: torch.nn.Module, path: Path, base_dir: str | None = None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in adapter_state(model).items()}, str(path / WEIGHTS_FILE))
    meta = adapter_meta(model)
    if meta is None:
        raise ConfigError("save_adapter was given a model that add_adapters never adapted",
                          "report this as a bug")
    meta = {**meta, "base_model_name_or_path": base_dir}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def is_bottleneck_adapter(path: Path) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.exists() and json.loads(config.read_text()).get("kind") == KIND


def load_adapter(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """Add the adapters saved in ``path`` to ``model`` (the base they were trained on) and load them."""
    from safetensors.torch import load_file

    meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    # Exact module names were saved, so match them exactly (a suffix match would be the same here).
    add_adapters(model, meta["bottleneck"], meta["target_modules"], meta["train_norms"])
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    missing = set(adapter_state(model)) - set(state)
    if missing:
        raise ConfigError(f"adapter in {path} lacks {sorted(missing)[:3]}",
                          "load it onto the base model it was trained with")
    model.load_state_dict(state, strict=False)
    return model
