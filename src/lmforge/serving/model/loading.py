"""Load a model directory for serving: safetensors weights, tokenizer, device, dtype, quantization.

Only safetensors and no remote code (a pickle or a model's own Python would run with the server's
rights). bf16 on CUDA, float32 on CPU; ``quantization`` ("int8", "int4", "fp8") replaces the decoder's
linear layers with quantized ones (``quant/quantize.py``).

A training run whose adapter cannot be merged leaves the base weights plus ``adapter/`` and a marker
file (``lmforge.train.artifacts``, which also reads the marker and applies the adapter for us).
Loading such a directory as a plain model would silently serve the base, so the marker is
honoured: bottleneck adapters are applied (and served by the HF backend), and so are peft's
LLaMA-Adapter (``adapter.variant: llama_adapter``) modules; peft prompt-learning adapters (prefix,
P-tuning v2, prompt tuning, P-tuning) become a per-layer key/value prefix computed once here
(``adapters/virtual_tokens.py``) that both backends place at the start of every sequence's KV cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.core.errors import ServingError
from lmforge.model.chat import stop_token_ids
from lmforge.serving.adapters import virtual_tokens
from lmforge.serving.model.onnx_model import load_onnx_model
from lmforge.serving.model.types import ServedModel
from lmforge.serving.quant.quantize import check_options, quantize_model
from lmforge.train.artifacts import apply_adapter, marked_adapter_dir
from lmforge.train.methods.bottleneck import is_bottleneck_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lmforge.model.types import CausalLM

log = logging.getLogger(__name__)


def load_model(model_dir: Path, device: str | None = None,
               quantization: str = "none") -> tuple[ServedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (model_dir / "model.onnx").is_file():  # written by `lmforge export-onnx`: served by ONNX Runtime
        return load_onnx_model(model_dir, device, quantization)
    if not (model_dir / "config.json").is_file():
        raise ServingError(
            f"{model_dir} is not a model directory (no config.json there)",
            "pass a directory written by training (config.json, model.safetensors, tokenizer files) "
            "or a registry URI such as models:/NAME@champion",
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quantization != "none":  # before the weights load: a wrong option should fail fast
        check_options(quantization, "auto", device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise ServingError(
            f"cannot load the model in {model_dir}: {exc}",
            "check that the directory holds config.json, model.safetensors and the tokenizer files",
        ) from exc
    model = _apply_adapter(base, model_dir, device)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' @wraps(Module.to): its stub takes self as 1st arg
    if quantization != "none":
        replaced = quantize_model(model, quantization)
        if not replaced:
            raise ServingError(f"serving.runtime.quantization is {quantization} but {type(model).__name__} has no "
                               "nn.Linear decoder layers to quantize",
                               "set serving.runtime.quantization to 'none' for this model")
        log.info("%s weight quantization: %d linear layers", quantization, replaced)
    return model, tokenizer


def eos_ids(model: ServedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a completion: the generation config's EOS ids, the tokenizer's, and its chat
    template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``), which ends every chat answer."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in configured if isinstance(configured, (list, tuple)) else [configured]:
        if value is not None:
            ids.add(int(value))
    ids.update(int(token) for token in stop_token_ids(tokenizer))
    return ids


def _apply_adapter(model: PreTrainedModel, model_dir: Path, device: str) -> CausalLM:
    adapter_dir = marked_adapter_dir(model_dir)
    if adapter_dir is None:
        return model
    if is_bottleneck_adapter(adapter_dir):
        log.info("applying the bottleneck adapter in %s", adapter_dir)
        return apply_adapter(model, adapter_dir)
    kind = virtual_tokens.peft_type(adapter_dir)
    if kind in virtual_tokens.PROMPT_LEARNING_TYPES:
        # Computed on the serving device, before any quantization: the prefix is the adapter's exact output.
        on_device = model.to(device).eval()  # type: ignore[arg-type]  # as in load_model: @wraps' stub
        prefix = virtual_tokens.attach_prefix(on_device, adapter_dir)
        log.info("%s adapter in %s: %d virtual tokens in every sequence's cache", kind, adapter_dir, prefix.length)
        return model
    if kind == "ADAPTION_PROMPT":  # LLaMA-Adapter: gated attention to learned prompts, inside peft's modules
        log.info("applying the LLaMA-Adapter in %s (served by the HF backend)", adapter_dir)
        return apply_adapter(model, adapter_dir)
    raise ServingError(
        f"{model_dir} holds an unmerged {kind} adapter, which the server cannot apply, and serving the base "
        "alone would be wrong",
        "train with a method lmforge trains (lora, qlora, ia3, adapter, prefix, ptuning_v2, prompt, ptuning), "
        "or serve the base model",
    )
