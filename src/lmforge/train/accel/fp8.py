"""FP8 matrix products for training: ``training.speed.fp8: true`` (Hopper or newer GPUs, torchao installed).

torchao's float8 training swaps each ``nn.Linear`` for a ``Float8Linear`` that keeps its float32
weight but multiplies in float8 (e4m3 forward, e5m2 gradients, one dynamic scale per tensor): twice
the tensor-core rate of bf16. The model's output layer stays in bf16 (its logits feed the loss
directly; torchtitan leaves it out for the same reason), as does any layer whose sizes are not
multiples of 16, which the FP8 kernels need.

GPT-2's blocks are written with transformers' ``Conv1D`` (a linear layer whose weight is stored
transposed), which torchao does not know. :func:`to_linear` rewrites them as ``nn.Linear`` for
training and :func:`restore_layout` turns them back before the model is saved, so the saved
directory loads in transformers as any GPT-2 does. Checkpoints written during training hold the
``nn.Linear`` layout; resuming converts the fresh model first, so the shapes agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from lmforge.train.accel.devices import require_gpu

if TYPE_CHECKING:
    from lmforge.model.types import CausalLM

_CONVERTED = "_lmforge_conv1d_names"  # the model's list of layers that were Conv1D, to restore before saving
_FLOAT8 = "_lmforge_fp8_names"  # the model's list of layers that torchao made Float8Linear


def check_available(device: torch.device) -> None:
    """Refuse ``training.speed.fp8`` where it cannot run, naming the fix (the config refuses adapter methods)."""
    require_gpu(device, "training.speed.fp8", lambda cc: cc >= (8, 9),
                "needs FP8 tensor cores (Ada, Hopper or newer GPUs)",
                "set training.speed.fp8: false", "torchao.float8", "pip install 'lmforge[gpu]' (or torchao)")


def to_linear(model: torch.nn.Module) -> int:
    """Replace every transformers ``Conv1D`` by the equivalent ``nn.Linear``; returns how many."""
    from transformers.pytorch_utils import Conv1D

    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name, conv in swaps:
        linear = torch.nn.Linear(conv.weight.shape[0], conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        linear.weight.requires_grad_(conv.weight.requires_grad)
        linear.bias.requires_grad_(conv.bias.requires_grad)
        model.set_submodule(name, linear)
    # Kept on the model, not the layers: torchao's swap replaces the layer objects (not their weights).
    setattr(model, _CONVERTED, getattr(model, _CONVERTED, []) + [name for name, _ in swaps])
    return len(swaps)


def restore_layout(model: torch.nn.Module) -> int:
    """Undo :func:`enable`: plain ``nn.Linear`` layers again (the same weights), GPT-2's back to
    ``Conv1D``, so the model saves in its own format and its saved probe is computed as served."""
    from transformers.pytorch_utils import Conv1D

    for name in getattr(model, _FLOAT8, []):
        fp8_layer = cast(torch.nn.Linear, model.get_submodule(name))  # torchao's Float8Linear is an nn.Linear
        with torch.device("meta"):
            linear = torch.nn.Linear(fp8_layer.in_features, fp8_layer.out_features, bias=fp8_layer.bias is not None)
        linear.weight, linear.bias = fp8_layer.weight, fp8_layer.bias
        model.set_submodule(name, linear)
    setattr(model, _FLOAT8, [])
    back = getattr(model, _CONVERTED, [])
    for name in back:
        plain = cast(torch.nn.Linear, model.get_submodule(name))  # to_linear made it one (torchao's swap undone above)
        conv = Conv1D(plain.out_features, plain.in_features)
        with torch.no_grad():
            conv.weight = torch.nn.Parameter(plain.weight.detach().t().contiguous())
            conv.bias = torch.nn.Parameter(plain.bias.detach().clone())
        model.set_submodule(name, conv.to(plain.weight.device))
    setattr(model, _CONVERTED, [])
    return len(back)


def enable(model: CausalLM) -> int:
    """Convert the model's linear layers (not its output layer) to FP8 training; returns how many."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    to_linear(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    converted = []

    def wanted(module: torch.nn.Module, name: str) -> bool:
        ok = (isinstance(module, torch.nn.Linear) and module is not head
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        if ok:
            converted.append(name)
        return ok

    convert_to_float8_training(model, module_filter_fn=wanted, config=Float8LinearConfig())
    setattr(model, _FLOAT8, converted)
    return len(converted)
