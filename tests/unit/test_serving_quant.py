"""Quantization at load (``serving.runtime.quantization``, ``serving.kv_cache.dtype``) on CPU.

What runs on CPU is checked here: the config's choices and the errors (cause and fix) for options
this machine cannot run; int8 weights through the paged engine (fused QKV and gate/up included)
against the quantized model's own forward; the int4 quantization math and nibble packing against
PyTorch's CPU tinygemm kernel (the CUDA kernel uses the same convention), and the learning of a
packed int4 layout (``int4_layout.py``) from a stand-in packer; fp8 weight rounding
bounds; and an fp8 KV cache end to end (four times the float32 blocks in the same budget,
logits close to the model's). The CUDA kernels themselves are checked on the device by
``bench/serve_quant.py`` (``python bench/serve_gpu.py --phases quant``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, make_tiny_model_dir
from pydantic import ValidationError

from lmforge.config.serving import KVCacheConfig, RuntimeConfig, ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.backends.base import PrefillItem
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.model.loading import load_model
from lmforge.serving.quant.int4_layout import int4_pack_nibbles, learn_layout, self_test, unpack
from lmforge.serving.quant.quantize import (
    Int8Linear,
    check_options,
    fp8_quantize,
    int4_dequantize,
    int4_quantize,
    int4_scales_and_zeros,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-quant"))


def test_config_accepts_the_options_and_refuses_others() -> None:
    cfg = ServingConfig(runtime=RuntimeConfig(quantization="int4"), kv_cache=KVCacheConfig(dtype="fp8"))
    assert (cfg.runtime.quantization, cfg.kv_cache.dtype) == ("int4", "fp8")
    with pytest.raises(ValidationError, match="quantization"):
        ServingConfig(runtime={"quantization": "int3"})
    with pytest.raises(ValidationError, match=r"kv_cache\.dtype"):
        ServingConfig(kv_cache={"dtype": "fp16"})


def test_options_this_machine_cannot_run_fail_with_cause_and_fix(model_dir: Path) -> None:
    for option in ("int4", "fp8"):
        with pytest.raises(ServingError, match="runs only on CUDA") as info:
            load_model(model_dir, device="cpu", quantization=option)
        assert "use quantization 'int8'" in str(info.value)
    with pytest.raises(ServingError,
                       match=r"(?s)unknown serving\.runtime\.quantization 'int3'.*use one of none, int8, int4, fp8"):
        check_options("int3", "auto", "cpu")
    with pytest.raises(ServingError, match=re.escape("unknown serving.kv_cache.dtype 'fp16'")):
        check_options("none", "fp16", "cpu")


def _logit_errors(engine: Engine, ids: list[int]) -> tuple[float, float]:
    """(prefill, decode) relative error of the paged runner's logits against the model's own forward."""
    backend = engine.backend
    row = backend.reserve(len(ids) + 1)
    try:
        with torch.no_grad():
            pre = backend.prefill([PrefillItem(row, 0, ids, all_logits=True)])[0]
            step = backend.decode([row], [len(ids)], [5])[0]
            ref = engine.model(torch.tensor([[*ids, 5]])).logits[0]
    finally:
        backend.release(row)
    return (float((pre - ref[:-1]).norm() / ref[:-1].norm()), float((step - ref[-1]).norm() / ref[-1].norm()))


def test_int8_runner_with_fused_layers_matches_the_quantized_model(model_dir: Path) -> None:
    engine = Engine.load(model_dir, device="cpu", cfg=ServingConfig(runtime=RuntimeConfig(quantization="int8")))
    try:
        attn = engine.model.model.layers[0].self_attn
        assert isinstance(attn.q_proj, Int8Linear) and attn.q_proj.qweight.dtype == torch.int8
        # The runner fused q/k/v: the parts now view one int8 tensor.
        assert attn.k_proj.qweight.data_ptr() == attn.q_proj.qweight.data_ptr() + attn.q_proj.qweight.numel()
        prefill_err, decode_err = _logit_errors(engine, engine.encode(PROMPTS[1]))
        assert prefill_err < 1e-5 and decode_err < 1e-5
        assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=0))[0].completion_tokens == 8
    finally:
        engine.close()


def test_int4_math_matches_the_tinygemm_kernel_convention() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    q, scale, zero = int4_quantize(weight, 128)
    assert int(q.min()) >= 0 and int(q.max()) <= 15 and scale.shape == (64, 2)
    # Round to nearest: every weight within half a step of its group (plus bf16 rounding of zero).
    step = scale.float().repeat_interleave(128, dim=1)
    assert bool(((int4_dequantize(q, scale, zero) - weight).abs() <= 0.5 * step + 2e-2).all())
    packed = int4_pack_nibbles(q)
    assert packed.shape == (64, 128)
    assert bool((packed >> 4 == q[:, ::2]).all()) and bool((packed & 15 == q[:, 1::2]).all())
    # PyTorch's CPU tinygemm kernel reads the same (q - 8) * scale + zero from these scales and zeros.
    x = torch.randn(5, 256).to(torch.bfloat16)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8), 128, int4_scales_and_zeros(scale, zero))
    want = x.float() @ int4_dequantize(q, scale, zero).t()
    assert float((kernel.float() - want).norm() / want.norm()) < 1e-2


def _tile_packer(perm_of_tile):
    """A stand-in for tinygemm's packing: tile (8 x 128) element e goes to nibble perm_of_tile(tile)[e]."""
    def pack(q: torch.Tensor) -> torch.Tensor:
        n, k = q.shape
        tiles = q.reshape(n // 8, 8, k // 128, 128).permute(0, 2, 1, 3).reshape(n // 8, k // 128, 1024)
        placed = torch.empty_like(tiles)
        for i in range(n // 8):
            for j in range(k // 128):
                placed[i, j, perm_of_tile(i, j)] = tiles[i, j]
        words = (placed.reshape(n // 8, k // 128, 128, 8).long() << torch.arange(0, 32, 4)).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(n // 8, k // 128, 32, 4)
    return pack


def test_int4_packed_layout_is_learned_and_checked() -> None:
    cpu = torch.device("cpu")
    perm = torch.randperm(1024, generator=torch.Generator().manual_seed(3))
    same = _tile_packer(lambda i, j: perm)
    layout = learn_layout(same, cpu)
    assert layout is not None and torch.equal(layout.long(), perm) and self_test(same, layout, cpu)
    q = torch.randint(0, 16, (16, 256), dtype=torch.int32)
    assert torch.equal(unpack(same(q), layout, 16, 256), q)
    # A layout that differs between tiles is learned from the first tile but fails the self-test.
    other = torch.randperm(1024, generator=torch.Generator().manual_seed(4))
    varying = _tile_packer(lambda i, j: perm if i == j == 0 else other)
    assert not self_test(varying, learn_layout(varying, cpu), cpu)


def test_fp8_weight_rounding_stays_within_e4m3_precision() -> None:
    torch.manual_seed(1)
    weight = torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different scales
    q, scale = fp8_quantize(weight)
    assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) <= 448
    back = q.float() * scale[:, None]
    rel = (back - weight).abs() / weight.abs().clamp(min=1e-3 * float(weight.abs().max()))
    assert float((back - weight).norm() / weight.norm()) < 0.04  # 3 mantissa bits: ~2-3% on average
    assert float(rel[weight.abs() > scale[:, None] * 2**-6].max()) <= 2**-4 + 1e-6  # half an ulp, normal range


def test_fp8_kv_cache_holds_more_tokens_and_stays_close(model_dir: Path) -> None:
    engines = {kv: Engine.load(model_dir, device="cpu",
                               cfg=ServingConfig(kv_cache=KVCacheConfig(dtype=kv, memory_mb=2)))
               for kv in ("auto", "fp8")}
    try:
        full, fp8 = engines["auto"].backend.cache, engines["fp8"].backend.cache
        assert fp8.keys.dtype == torch.float8_e4m3fn and full.keys.dtype == torch.float32
        assert fp8.num_blocks == 4 * full.num_blocks  # 1 byte per element instead of 4, same budget
        ids = engines["fp8"].encode(PROMPTS[1])
        prefill_err, decode_err = _logit_errors(engines["fp8"], ids)
        assert 0 < prefill_err < 0.1 and 0 < decode_err < 0.1  # rounded, not broken
        done = engines["fp8"].generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0))[0]
        assert done.completion_tokens == 6
    finally:
        for engine in engines.values():
            engine.close()
