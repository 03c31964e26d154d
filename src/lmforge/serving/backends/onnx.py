"""The ONNX backend: the HF backend's dense-cache batching over an ONNX Runtime session (CPU).

    lmforge serve OUT_DIR          (a directory written by `lmforge export-onnx MODEL OUT_DIR`)

``model/onnx_model.py`` loads the export as an :class:`OnnxCausalLM` that looks like a transformers
causal LM; :class:`HFBackend` then batches it unchanged, under the name ``onnx``.
"""

from __future__ import annotations

import logging

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.backends.hf import HFBackend
from lmforge.serving.model.onnx_model import OnnxCausalLM
from lmforge.serving.model.types import ServedModel

log = logging.getLogger(__name__)


def make_onnx_backend(model: ServedModel, cfg: ServingConfig) -> HFBackend:
    """The engine's dense-cache backend over ONNX Runtime, or an error if the model or config disagree."""
    if not isinstance(model, OnnxCausalLM):
        raise ServingError("serving.runtime.engine is 'onnx' but the model directory holds PyTorch weights, not an "
                           "export", "run `lmforge export-onnx MODEL OUT_DIR` and serve OUT_DIR, or set "
                           "serving.runtime.engine to 'auto'")
    if cfg.runtime.engine not in ("auto", "onnx"):
        raise ServingError(f"serving.runtime.engine is {cfg.runtime.engine!r} but {model.model_dir} is an ONNX export",
                           "set serving.runtime.engine to 'auto' or 'onnx', or serve the PyTorch model directory")
    model.start(cfg.runtime.onnx_threads)
    backend = HFBackend(model, cfg.scheduler.max_batch_size, name="onnx")
    log.info("serving %s through ONNX Runtime (CPU, %s threads)", model.model_dir, cfg.runtime.onnx_threads or "all")
    return backend
