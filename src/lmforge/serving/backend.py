"""What the engine asks of a model backend, and the choice between the two backends.

The engine (``engine.py``) schedules; a backend holds the model and its KV cache and runs forward
passes. ``paged.PagedBackend`` (our Llama runner over a paged cache, CUDA graphs on GPUs) serves
the models it supports; ``batch.HFBackend`` (the model's own forward with a dense cache) serves
every other causal LM, so whatever lmforge trains can be served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.runtime import cpu_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillItem:
    row: int  # the sequence's backend row (from reserve)
    start: int  # position of the first token in ``ids`` (earlier chunks are already cached)
    ids: list[int]
    all_logits: bool = False  # logits for every token of the chunk (echo's prompt logprobs), else the last


class Backend(Protocol):
    name: str
    chunked_prefill: bool  # False: prefill items must be whole prompts

    def fits_ever(self, tokens: int) -> bool: ...
    def can_reserve(self, tokens: int) -> bool: ...
    def reserve(self, tokens: int) -> int: ...
    def release(self, row: int) -> None: ...
    def prefill(self, items: list[PrefillItem]) -> list[torch.Tensor]: ...
    def decode(self, rows: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor: ...

    @property
    def cache_usage(self) -> float: ...


def make_backend(model: torch.nn.Module, cfg: ServingConfig, max_len: int) -> Backend:
    """The paged backend when ``cfg.engine`` allows it and the model is supported, else the HF one."""
    from lmforge.serving.batch import HFBackend
    from lmforge.serving.model_runner import unsupported

    if cfg.adapters and (cfg.engine in ("hf", "onnx") or unsupported(model)):
        raise ServingError(f"serving.adapters (several unmerged LoRA adapters) needs the paged engine, but "
                           f"{unsupported(model) or f'serving.engine is {cfg.engine}'}",
                           "serve each adapter merged as its own model (lmforge serve RUN/model), or set "
                           "serving.engine to 'auto' for a Llama base")
    if cfg.engine == "onnx" or type(model).__name__ == "OnnxCausalLM":  # a directory from `lmforge export-onnx`
        from lmforge.serving.onnx_backend import make_onnx_backend

        return make_onnx_backend(model, cfg)
    reason = unsupported(model)
    if cfg.engine == "paged" and reason:
        raise ServingError(f"serving.engine is 'paged' but {reason}",
                           "set serving.engine to 'auto' or 'hf' to serve this model with the HF backend")
    if cfg.engine == "hf" or reason:
        if reason:
            log.info("serving with the HF backend: %s", reason)
        return HFBackend(model, cfg.max_batch_size)
    from lmforge.serving.paged import PagedBackend

    return PagedBackend(model, cfg, max_len)


# Below this width a CPU matmul takes microseconds, and waking another OpenMP thread for it costs
# ~100 us when the process has more OpenMP threads than cores (as it does once a second thread, the
# engine's, runs torch): measured 2x more tokens/s for the demo model with one thread (RESULTS.md).
SMALL_HIDDEN = 1024


def cpu_threads(cfg: ServingConfig, model_config) -> int:
    """torch threads for the engine thread on a CPU: the configured count, else by model width."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    return 1 if getattr(model_config, "hidden_size", SMALL_HIDDEN) < SMALL_HIDDEN else cpu_count()
