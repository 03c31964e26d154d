"""Weight quantization at load: ``serving.runtime.quantization: none | int8 | int4 | fp8``.

Each ``nn.Linear`` of the decoder layers becomes a :class:`QuantLinear`; the embedding and the
output head stay in full precision (the layers most sensitive to rounding). The paged runner fuses
the QKV and gate/up layers (``model/runner.py``: ``FusedLinear``); :meth:`QuantLinear.fuse` concatenates the
quantized storage of the parts (every scale here is per output channel or per group of one output
channel, so quantizing the parts and concatenating equals quantizing the fused tensor) and
re-points the parts at it, so no weight is held twice.

- ``int8`` (:class:`Int8Linear`, CPU and CUDA): symmetric, one scale per output channel
  (``w ≈ q * scale``, ``|q| <= 127``), activations untouched. CPU: PyTorch's fused
  ``_weight_int8pack_mm``; CUDA: our Triton kernel (``kernels/quant.py``: ``weight_only_mm``) that reads the
  int8 weights directly, inside the captured decode graphs too.
- ``int4`` (:class:`Int4Linear`, CUDA): asymmetric groups of 128 input channels
  (``w ≈ (q - 8) * scale + zero``, ``0 <= q <= 15``) in the packed layout of PyTorch's tinygemm
  kernel (``_weight_int4pack_mm``, the one gpt-fast and torchao use); a quarter of the bf16 weight
  bytes. Up to 16 rows tinygemm multiplies; for more (batched decode, prefill), where tinygemm is
  slow, a Triton kernel widens the packed weights to bf16 for cuBLAS (``quant/int4_layout.py``).
- ``fp8`` (:class:`Fp8Linear`, CUDA with compute capability >= 8.9): float8 e4m3 weights with one
  scale per output channel. Prefill (more than 64 rows): activations quantized per row at run time
  (``kernels/quant.py``) and multiplied by ``torch._scaled_mm`` on the fp8 tensor cores. Decode (up to
  64 rows) is bound by weight bytes, where the activation quantization and ``_scaled_mm``'s
  small-M kernels cost more than they save (an H100 measured 0.84x the bf16 speed for one stream),
  so the fp8 weights are read by the weight-only kernel that int8 uses, with bf16 activations.

:func:`check_options` turns an option this machine cannot run into a :class:`ServingError` naming
the cause and the fix; the KV cache dtype (``serving.kv_cache.dtype``) is resolved here too.

Used by ``lmforge serve MODEL`` with ``serving.runtime.quantization`` set; tested on CPU by
``pytest tests/unit/test_serving_quant.py``, measured on a GPU by ``python bench/serve_gpu.py --phases quant``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol, Self

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ServingError
from lmforge.serving.quant.int4_layout import INT4_INNER_K_TILES, int4_pack_nibbles, tinygemm_layout

WEIGHT_OPTIONS = ("none", "int8", "int4", "fp8")
KV_OPTIONS = ("auto", "bf16", "fp8")
INT4_GROUP = 128
INT4_TINYGEMM_ROWS = 16  # Int4Linear: up to this many rows tinygemm; more: widen to bf16 + cuBLAS (int4_layout.py)
FP8_WEIGHT_ONLY_ROWS = 64  # Fp8Linear: up to this many rows (decode), fp8 weights with bf16 activations


def _matmul_unimplemented(self: QuantLinear, x2: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


class QuantLinear(nn.Module):
    """Base of the quantized linear layers: the parts :meth:`fuse` concatenates are listed in ``rows``."""

    rows: tuple[str, ...] = ()  # buffers whose dim 0 is the output channel (views of the fused storage)
    row_tile: ClassVar[dict[str, int]] = {}  # output channels per dim-0 entry, where not 1
    bias: torch.Tensor | None  # a buffer (register_buffer)
    # ``x2 [M, K]`` times the weight, given the tensors of ``_tensors`` by name; each subclass names
    # its own (as nn.Module types ``forward``, so subclasses may take their own parameters).
    matmul: Callable[..., torch.Tensor] = _matmul_unimplemented

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_2d(x, self._tensors(), self.bias, self.out_features)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.rows}

    def _apply_2d(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).contiguous(), **tensors)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], out_features)

    @classmethod
    def fuse(cls, mods: list[Self]) -> Callable[[torch.Tensor], torch.Tensor]:
        """One matmul for several layers with the same input; they now view the fused storage."""
        if len(mods) == 1:
            return mods[0]
        fused = {name: torch.cat([getattr(m, name) for m in mods]) for name in cls.rows}
        fused.update(mods[0].fuse_extra(mods))
        bias = None
        if any(m.bias is not None for m in mods):
            ref = fused[cls.rows[0]]
            bias = torch.cat([m.bias if m.bias is not None else ref.new_zeros(m.out_features, dtype=_bias_dtype(mods))
                              for m in mods])
        starts = [0]
        for m in mods:
            starts.append(starts[-1] + m.out_features)
        for m, start, end in zip(mods, starts, starts[1:]):
            for name in cls.rows:
                tile = cls.row_tile.get(name, 1)
                setattr(m, name, fused[name][start // tile:end // tile])
            if m.bias is not None and bias is not None:  # bias is set whenever any part has one
                m.bias = bias[start:end]
        head = mods[0]
        total = starts[-1]
        return lambda x: head._apply_2d(x, fused, bias, total)

    def fuse_extra(self, mods: list[Self]) -> dict[str, torch.Tensor]:
        """Fused tensors that are not split by output row (int4's group scales)."""
        return {}


def _bias_dtype(mods: Sequence[QuantLinear]) -> torch.dtype:
    return next(m.bias.dtype for m in mods if m.bias is not None)


def _bias_of(linear: nn.Linear) -> torch.Tensor | None:
    return linear.bias.data if linear.bias is not None else None


class _PerChannel(QuantLinear):
    """One-byte weights ``qweight [N, K]`` with one float32 scale per output channel (int8, fp8)."""

    rows = ("qweight", "scale")
    qweight: torch.Tensor  # buffers (register_buffer)
    scale: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(int(qweight.shape[1]), int(qweight.shape[0]), bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> _PerChannel:
        qweight, scale = cls.quantize(linear.weight.data)
        return cls(qweight, scale, _bias_of(linear))


class Int8Linear(_PerChannel):
    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return int8_quantize(weight)

    def matmul(self, x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x2, qweight, scale)


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (``q`` int8 ``[N, K]``, ``scale`` float32 ``[N]``)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_matmul(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` times int8 ``qweight [N, K]``, scaled per output channel."""
    if x2.device.type == "cuda" and x2.dtype in (torch.bfloat16, torch.float16) and _triton_available():
        from lmforge.serving.kernels.quant import weight_only_mm

        return weight_only_mm(x2, qweight, scale)
    if _fused_kernel_works(x2.device.type, x2.dtype):
        return torch.ops.aten._weight_int8pack_mm(x2, qweight, scale.to(x2.dtype))
    return F.linear(x2, qweight.to(x2.dtype)) * scale.to(x2.dtype)  # memory saved, not time


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401 - imported to check that it is installed
    except ImportError:
        return False
    return True


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


# ---------------------------------------------------------------- int4 (tinygemm)


def int4_quantize(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` input channels, in tinygemm's convention.

    Returns (``q`` int32 ``[N, K]`` in 0..15, ``scale`` and ``zero`` bf16 ``[N, K // group]``) with
    ``w ≈ (q - 8) * scale + zero``; ``q`` is computed from the bf16-rounded scale and zero the kernel
    will use, so the rounding error stays within half a step.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zero = (lo + scale.float() * 8).to(torch.bfloat16)
    floor = zero.float() - scale.float() * 8
    q = ((w - floor[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, zero


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scale.shape[1]
    w = (q.reshape(n, groups, k // groups).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(n, k)


def int4_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """tinygemm's ``[K // group, N, 2]`` layout of the per-group scales and zeros."""
    return torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()


class Int4Linear(QuantLinear):
    # The packed weight's dim 0 is tiles of 8 output channels (independent of each other), so
    # concatenating along it fuses layers; the group scales are fused along their dim 1.
    rows = ("packed",)
    row_tile: ClassVar[dict[str, int]] = {"packed": 8}
    packed: torch.Tensor  # buffers (register_buffer)
    scales_and_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                 out_features: int, bias: torch.Tensor | None, group: int) -> None:
        super().__init__(in_features, out_features, bias)
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        n, k = linear.weight.shape
        if k % INT4_GROUP or n % 8:
            raise ServingError(f"int4 (tinygemm) needs in_features divisible by {INT4_GROUP} and out_features by 8; "
                               f"a layer here is {k} -> {n}", "use quantization 'int8' or 'fp8' for this model")
        q, scale, zero = int4_quantize(linear.weight.data, INT4_GROUP)
        packed = torch.ops.aten._convert_weight_to_int4pack(int4_pack_nibbles(q).to(linear.weight.device),
                                                           INT4_INNER_K_TILES)
        sz = int4_scales_and_zeros(scale, zero).to(linear.weight.device)
        return cls(packed, sz, k, n, _bias_of(linear), INT4_GROUP)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales_and_zeros": self.scales_and_zeros}

    def fuse_extra(self, mods: list[Self]) -> dict[str, torch.Tensor]:
        return {"scales_and_zeros": torch.cat([m.scales_and_zeros for m in mods], dim=1)}

    def matmul(self, x2: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        x = x2.to(torch.bfloat16)
        layout = tinygemm_layout(str(x.device)) if x.shape[0] > INT4_TINYGEMM_ROWS else None
        if layout is None:
            return torch.ops.aten._weight_int4pack_mm(x, packed, self.group, scales_and_zeros).to(x2.dtype)
        from lmforge.serving.kernels.quant import int4_widen

        weight = int4_widen(packed, scales_and_zeros, layout, packed.shape[0] * 8, self.in_features, self.group)
        return F.linear(x, weight).to(x2.dtype)


# ---------------------------------------------------------------- fp8 (Hopper / Ada)


def fp8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 per output channel: (``q [N, K]``, ``scale`` float32 ``[N]``), ``w ≈ q * scale``."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 448.0
    return (w / scale[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


class Fp8Linear(_PerChannel):
    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_quantize(weight)

    def matmul(self, x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        from lmforge.serving.kernels.quant import quant_rows_fp8, weight_only_mm

        m = x2.shape[0]
        if m <= FP8_WEIGHT_ONLY_ROWS:
            return weight_only_mm(x2, qweight, scale)
        padded = -(-m // 16) * 16  # _scaled_mm wants the row count a multiple of 16

        xq, xs = quant_rows_fp8(x2, padded)
        y = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=torch.bfloat16)
        return y[:m].to(x2.dtype)


# ---------------------------------------------------------------- options, checks, model surgery

class QuantLinearClass(Protocol):
    """A quantized layer class, as :func:`quantize_model` uses it: it quantizes an ``nn.Linear``."""

    def from_linear(self, linear: nn.Linear) -> QuantLinear: ...


_CLASSES: dict[str, QuantLinearClass] = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}


def check_options(quantization: str, kv_cache_dtype: str, device: str) -> None:
    """Raise :class:`ServingError` (cause and fix) when this machine cannot run the chosen options."""
    if quantization not in WEIGHT_OPTIONS:
        raise ServingError(f"unknown serving.runtime.quantization {quantization!r}",
                           f"use one of {', '.join(WEIGHT_OPTIONS)}")
    if kv_cache_dtype not in KV_OPTIONS:
        raise ServingError(f"unknown serving.kv_cache.dtype {kv_cache_dtype!r}", f"use one of {', '.join(KV_OPTIONS)}")
    cuda = device.startswith("cuda")
    if quantization in ("int4", "fp8") and not cuda:
        raise ServingError(f"serving.runtime.quantization {quantization!r} runs only on CUDA GPUs; the device is "
                           f"{device!r}",
                           "serve on a CUDA device, or use quantization 'int8' (CPU and GPU) or 'none'")
    if quantization == "int4" and torch.cuda.get_device_capability(device) < (8, 0):
        raise ServingError("serving.runtime.quantization 'int4' needs compute capability >= 8.0 (tinygemm kernel)",
                           "use quantization 'int8' on this GPU")
    needs_fp8 = [name for name, on in (("runtime.quantization", quantization == "fp8"),
                                       ("kv_cache.dtype", kv_cache_dtype == "fp8" and cuda)) if on]
    if needs_fp8 and torch.cuda.get_device_capability(device) < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ServingError(f"serving.{needs_fp8[0]} 'fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper); "
                           f"this one has {cap}", "use runtime.quantization 'int8' or 'int4' and kv_cache.dtype 'bf16'")


def kv_cache_dtype(option: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache storage dtype: 'auto' is the model's, 'bf16' bfloat16, 'fp8' float8 e4m3."""
    return {"auto": model_dtype, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[option]


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:  # GPT-2 style: model.transformer.h
        layers = getattr(getattr(model, "transformer", None), "h", None)
    return layers


def quantize_model(model: nn.Module, method: str) -> int:
    """Replace every ``nn.Linear`` inside the decoder layers of ``model`` in place; returns how many."""
    layers = decoder_layers(model)
    if layers is None or method == "none":
        return 0
    cls = _CLASSES[method]
    replaced = 0
    for layer in layers:
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], cls.from_linear(child))
                replaced += 1
    return replaced


def quantize_int8(model: nn.Module) -> int:
    return quantize_model(model, "int8")
