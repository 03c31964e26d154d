"""Device checks the speed features share: refuse a feature the GPU or the installed packages cannot run."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from lmforge.core.errors import ConfigError


def require_gpu(device: torch.device, feature: str, capable: Callable[[tuple[int, int]], bool], needs: str,
                fix: str, module: str, install: str) -> None:
    """Refuse ``feature`` unless ``device`` is a GPU whose compute capability ``capable`` accepts and
    ``module`` imports; each error names the cause and the fix."""
    if device.type != "cuda" or not capable(torch.cuda.get_device_capability(device)):
        where = device.type if device.type != "cuda" else f"compute capability {torch.cuda.get_device_capability(device)}"
        raise ConfigError(f"{feature} {needs} (this is {where})", fix)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{feature} needs the {module.split('.')[0]} package ({exc})", f"{install}, or {fix}") from exc
