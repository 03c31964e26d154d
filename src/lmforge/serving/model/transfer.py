"""Host <-> device copies that never wait for the work already queued on the GPU.

A plain copy between the host and a CUDA device (``torch.tensor(values, device="cuda")``,
``tensor.to("cuda")``, ``.tolist()``) synchronizes the whole stream: with a decode step launched
ahead (``engine/steps.py``) the CPU would wait for that step to finish, and the GPU would then
idle while the CPU prepares the next one. These copies go through pinned memory, asynchronously;
torch's caching host allocator keeps a pinned buffer alive until the copy that reads it has run.
On a CPU device they are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pinned(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a host tensor, in pinned memory when ``device`` is a CUDA device (the source of an
    asynchronous copy to it)."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")


def to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device``, copied without waiting for the device's queued work."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return pinned(values, dtype, device).to(device, non_blocking=True)


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued behind the work that
    computes them, and :meth:`wait` blocks only until that copy has run, not for later launches."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> list[Any]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
