"""Weight-only int8 quantization at load: ``serving.quantization: int8``.

Each ``nn.Linear`` of the decoder layers becomes an :class:`Int8Linear`: int8 weights with one
symmetric scale per output channel (``w ≈ q * scale``, ``|q| <= 127``), activations untouched. The
embedding and the output head stay in full precision (they are the layers most sensitive to
rounding). On CPU the matmul is PyTorch's fused int8-weight kernel (``_weight_int8pack_mm``), which
reads a quarter of the float32 weight bytes; where that kernel is missing (e.g. CUDA builds without
it) the weight is dequantized per call, which saves memory but not time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = int(qweight.shape[1])
        self.out_features = int(qweight.shape[0])
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.data.float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        qweight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.data if linear.bias is not None else None
        return cls(qweight, scale.to(linear.weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.qweight, self.scale, self.bias)

    @staticmethod
    def fuse(mods: list["Int8Linear"]):
        """One int8 matmul for several layers with the same input; they now view the fused storage."""
        if len(mods) == 1:
            return mods[0]
        qweight = torch.cat([m.qweight for m in mods])
        scale = torch.cat([m.scale for m in mods])
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias if m.bias is not None else scale.new_zeros(m.out_features) for m in mods])
        start = 0
        for m in mods:
            end = start + m.out_features
            m.qweight, m.scale = qweight[start:end], scale[start:end]
            if m.bias is not None:
                m.bias = bias[start:end]
            start = end
        return lambda x: int8_matmul(x, qweight, scale, bias)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if _fused_kernel_works(x.device.type, x.dtype):
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scale.to(x.dtype))
    else:
        y = F.linear(x2, qweight.to(x.dtype)) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], qweight.shape[0])


@functools.cache
def _fused_kernel_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``_weight_int8pack_mm`` exists and is right for this device and dtype (checked once)."""
    try:
        x = torch.randn(2, 64, device=device_type).to(dtype)
        q = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device=device_type)
        s = torch.rand(32, device=device_type).to(dtype) + 0.5
        got = torch.ops.aten._weight_int8pack_mm(x, q, s).float()
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    want = (x.float() @ q.float().t()) * s.float()
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))


def quantize_int8(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside the decoder layers of ``model`` in place; returns how many."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:  # GPT-2 style: model.transformer.h
        layers = getattr(getattr(model, "transformer", None), "h", None)
    if layers is None:
        return 0
    replaced = 0
    for layer in layers:
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], Int8Linear.from_linear(child))
                replaced += 1
    return replaced
