"""Choose the backend that serves a model: paged where our runner supports it, else the HF one.

``serving.runtime.engine`` (auto, paged, hf, onnx) and the model decide: a model directory written by
``lmforge export-onnx`` is served through ONNX Runtime (``onnx.py``), a Llama-family model by
``paged.PagedBackend`` (split over several GPUs by ``tensor_parallel.TensorParallelBackend`` with
``serving.tensor_parallel``), every other causal LM by ``hf.HFBackend``, so whatever lmforge trains
can be served.
"""

from __future__ import annotations

import logging
from typing import cast

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.backends.base import Backend
from lmforge.serving.backends.hf import HFBackend
from lmforge.serving.backends.onnx import make_onnx_backend
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.backends.tensor_parallel import TensorParallelBackend
from lmforge.serving.model.onnx_model import OnnxCausalLM
from lmforge.serving.model.runner import unsupported
from lmforge.serving.model.types import LlamaCausalLM, ServedModel

log = logging.getLogger(__name__)


def make_backend(model: ServedModel, cfg: ServingConfig, max_len: int) -> Backend:
    """The paged backend when ``cfg.runtime.engine`` allows it and the model is supported, else the HF one."""
    if cfg.adapters and (cfg.runtime.engine in ("hf", "onnx") or unsupported(model)):
        raise ServingError(f"serving.adapters (several unmerged LoRA adapters) needs the paged engine, but "
                           f"{unsupported(model) or f'serving.runtime.engine is {cfg.runtime.engine}'}",
                           "serve each adapter merged as its own model (lmforge serve RUN/model), or set "
                           "serving.runtime.engine to 'auto' for a Llama base")
    if cfg.runtime.engine == "onnx" or isinstance(model, OnnxCausalLM):  # a directory from `lmforge export-onnx`
        if cfg.tensor_parallel > 1:
            raise ServingError(f"serving.tensor_parallel {cfg.tensor_parallel} needs the paged engine, and this is an "
                               "ONNX export", "serve the trained model directory instead, or set "
                               "serving.tensor_parallel to 1")
        return make_onnx_backend(model, cfg)
    reason = unsupported(model)
    if cfg.runtime.engine == "paged" and reason:
        raise ServingError(f"serving.runtime.engine is 'paged' but {reason}",
                           "set serving.runtime.engine to 'auto' or 'hf' to serve this model with the HF backend")
    if cfg.tensor_parallel > 1 and reason:
        raise ServingError(f"serving.tensor_parallel {cfg.tensor_parallel} needs the paged engine, but {reason}",
                           "set serving.tensor_parallel to 1 to serve this model on one device")
    if cfg.runtime.engine == "hf" or reason:
        if reason:
            log.info("serving with the HF backend: %s", reason)
        return HFBackend(model, cfg.scheduler.max_batch_size)
    llama = cast(LlamaCausalLM, model)  # unsupported() found nothing: a Llama
    if cfg.tensor_parallel > 1:
        return TensorParallelBackend(llama, cfg, max_len)
    return PagedBackend(llama, cfg, max_len)
