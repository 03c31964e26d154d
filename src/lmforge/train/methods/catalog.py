"""Training methods: what each trains, how it is applied to a model, and whether it can be merged.

``training.method`` names one of :data:`METHODS`. :func:`apply_method` turns the phase's base model
into the model the loop trains (the base itself for ``pretrain`` and ``full``; a peft model or our
bottleneck adapters otherwise) with only the method's parameters trainable. Mergeable methods
(the LoRA family and IA3) are folded into the base after training; the others are saved beside
it (:mod:`lmforge.train.artifacts`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.train.methods import bottleneck as adapters

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel

    from lmforge.model.types import CausalLM


@dataclass(frozen=True)
class MethodInfo:
    name: str
    trains: str
    mergeable: bool
    architectures: tuple[str, ...] | None = None  # None: any causal LM transformers knows
    needs_cuda: bool = False

    @property
    def adapts(self) -> bool:
        """Whether it trains something beside a frozen base (saved as an adapter)."""
        return self.name not in ("pretrain", "full")


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("pretrain", "all weights, from random initialization (no fine-tuning phase)", True),
    MethodInfo("full", "all weights", True),
    MethodInfo("lora", "low-rank updates of the target linear layers", True),
    MethodInfo("qlora", "low-rank updates over a 4-bit NF4 base (bitsandbytes)", True, needs_cuda=True),
    MethodInfo("adapter", "bottleneck MLPs after attention and feed-forward blocks, and the norms "
               "(variant llama_adapter: gated adaption prompts)", False),
    MethodInfo("prefix", "per-layer key/value prefixes through a reparameterization MLP", False),
    MethodInfo("ptuning_v2", "per-layer key/value prefixes, directly (deep prompt tuning)", False),
    MethodInfo("prompt", "virtual token embeddings before the input", False),
    MethodInfo("ptuning", "virtual token embeddings produced by a prompt encoder (MLP or LSTM)", False),
    MethodInfo("ia3", "learned rescaling vectors of keys, values and feed-forward activations", True),
)}
LLAMA_ADAPTER_ARCHITECTURES = ("llama", "mistral", "gpt2")  # peft's adaption-prompt model types


def method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}", f"set training.method to one of {sorted(METHODS)}")
    return METHODS[name]


def apply_method(model: PreTrainedModel, training: TrainingConfig, base_dir: Path | None = None,
                 device: torch.device | None = None) -> CausalLM:
    """The model the fine-tuning phase trains; ``base_dir`` holds the saved base (QLoRA reloads it)."""
    info = method_info(training.method)
    if not info.adapts:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if training.method == "adapter" and training.adapter.variant == "houlsby":
        cfg = training.adapter
        adapters.add_adapters(model, cfg.bottleneck, list(cfg.target_modules) or None, cfg.train_norms)
        return model
    if training.method == "qlora":
        model = _quantized_base(base_dir, device)
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():
            # peft asks the model a question transformers has renamed; nothing for users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, peft_config(training, model.config.model_type))
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise ConfigError(f"training.method {training.method} cannot be applied to this "
                          f"{model.config.model_type} model: {exc}", _fix(training, model)) from None


def peft_config(training: TrainingConfig, model_type: str) -> PeftConfig:
    """peft's config for a method that peft implements."""
    import peft

    method = training.method
    if method in ("lora", "qlora"):
        cfg = training.lora
        targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                               task_type="CAUSAL_LM")
    if method == "adapter":  # the llama_adapter variant
        if model_type not in LLAMA_ADAPTER_ARCHITECTURES:
            raise ConfigError(f"LLaMA-Adapter (training.adapter.variant: llama_adapter) supports "
                              f"{list(LLAMA_ADAPTER_ARCHITECTURES)}, not {model_type}",
                              "use training.adapter.variant: houlsby, or a llama-family model")
        return peft.AdaptionPromptConfig(adapter_len=training.adapter.adapter_len,
                                         adapter_layers=training.adapter.adapter_layers, task_type="CAUSAL_LM")
    prompt = training.prompt_learning
    if method in ("prefix", "ptuning_v2"):
        # Prefix tuning trains prefixes through an MLP (stabler); P-tuning v2 trains them directly.
        return peft.PrefixTuningConfig(num_virtual_tokens=prompt.num_virtual_tokens, task_type="CAUSAL_LM",
                                       prefix_projection=method == "prefix",
                                       encoder_hidden_size=prompt.encoder_hidden_size)
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=prompt.num_virtual_tokens, task_type="CAUSAL_LM")
    if method == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=prompt.num_virtual_tokens, task_type="CAUSAL_LM",
                                        encoder_hidden_size=prompt.encoder_hidden_size,
                                        encoder_reparameterization_type=prompt.encoder)
    if method == "ia3":
        ia3 = training.ia3
        return peft.IA3Config(target_modules=list(ia3.target_modules) or None,
                              feedforward_modules=list(ia3.feedforward_modules) or None, task_type="CAUSAL_LM")
    raise ConfigError(f"training.method {method} is not a peft method", "use lora, qlora, ia3 or a prompt method")


def check_method(training: TrainingConfig, use_cuda: bool) -> None:
    """Fail before building anything when the method cannot run here."""
    info = method_info(training.method)
    if info.needs_cuda:
        if not use_cuda:
            raise ConfigError("QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels), and this run is on the CPU",
                              "run it on a CUDA machine with training.placement.use_gpu: true, or use "
                              "training.method: lora")
        try:
            import bitsandbytes  # noqa: F401 - imported only to check that it is installed
        except ImportError:
            raise ConfigError("QLoRA needs the bitsandbytes package, which is not installed",
                              "pip install bitsandbytes (CUDA machines), or use training.method: lora") from None


def _quantized_base(base_dir: Path | None, device: torch.device | None) -> PreTrainedModel:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if base_dir is None:
        raise ConfigError("QLoRA needs the base saved to disk to reload it in 4 bits", "report this as a bug")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, use_safetensors=True,
                                                 device_map={"": device.index or 0} if device else None)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _fix(training: TrainingConfig, model: PreTrainedModel) -> str:
    if training.method in ("lora", "qlora"):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        return f"set training.lora.target_modules to some of {linear} (or [all-linear])"
    if training.method == "ia3":
        return "set training.ia3.target_modules (and feedforward_modules) to module names of this model"
    return "choose another training.method for this architecture (README: methods table)"
