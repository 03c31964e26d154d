"""Reading tinygemm's packed int4 weights back, for int4 matmuls of many rows.

PyTorch's tinygemm kernel (``_weight_int4pack_mm``) is fast for a few rows (a decode step of a few
streams) but slow for many: an H100 measured 3.3 ms for a 2048-row prefill through the 1.1B's
gate/up layer against 0.13 ms in bf16. For many rows it is cheaper to widen the weights to bf16
(one pass at memory speed) and use cuBLAS. Keeping a second copy of the weights in a simpler
layout would double their memory, so the widening reads tinygemm's own packed layout.

That layout (``_convert_weight_to_int4pack``: ``[N/8, K/(16*inner_k_tiles), 32, inner_k_tiles/2]``
int32, eight nibbles a word, arranged for the tensor cores' fragments) is an implementation detail
of PyTorch, so it is not written down here but *learned* once per process: the packing op is run
on probe matrices whose entries encode their own position (three 4-bit planes of a 10-bit index for
one 8x128 tile), which yields each element's nibble position in its tile. A self-test on random
weights must then read back exactly what was packed; otherwise (a PyTorch whose layout differs
between tiles, say) the learned layout is refused and tinygemm serves every row count.

Tested on CPU with a stand-in packer (``pytest tests/unit/test_serving_quant.py``); on the device by
``python bench/serve_quant.py`` (its check section compares with the quantized values).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

TILE_N, TILE_K = 8, 128  # one packed tile with inner_k_tiles=8: 8 output channels x 128 inputs
INT4_INNER_K_TILES = 8  # the inner_k_tiles Int4Linear packs with (quant/quantize.py)
Packer = Callable[[torch.Tensor], torch.Tensor]  # q [N, K] int32 0..15 -> packed int32 tiles


def int4_pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` (0..15) as uint8 ``[N, K // 2]``, even columns in the high nibble (torch >= 2.5's input)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every nibble of ``packed`` (int32 words), word by word, low nibble first: ``[..., words * 8]``."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed.reshape(*packed.shape[:2], -1)[..., None] >> shifts) & 15).reshape(*packed.shape[:2], -1)


def learn_layout(pack: Packer, device: torch.device) -> torch.Tensor | None:
    """Nibble position (within its tile) of each element ``r * 128 + c`` of a tile; None if not a permutation."""
    index = torch.arange(TILE_N * TILE_K, device=device, dtype=torch.int32).reshape(TILE_N, TILE_K)
    element = torch.zeros(TILE_N * TILE_K, dtype=torch.int64, device=device)
    for plane in range(3):  # 10 bits of index, 4 per probe
        probe = pack((index >> (4 * plane)) & 15)
        element |= nibbles(probe).reshape(-1).long() << (4 * plane)
    if not torch.equal(element.sort().values, torch.arange(TILE_N * TILE_K, device=device)):
        return None
    position = torch.empty_like(element)
    position[element] = torch.arange(element.numel(), device=device)
    return position.to(torch.int32)


def unpack(packed: torch.Tensor, layout: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int4 values ``[N, K]`` (0..15, int32) held by ``packed`` (PyTorch ops; the check and tests use it)."""
    tiles = nibbles(packed)[:, :, layout.long()]  # [N/8, K/128, 1024] in element order
    return tiles.reshape(n // TILE_N, k // TILE_K, TILE_N, TILE_K).permute(0, 2, 1, 3).reshape(n, k)


def self_test(pack: Packer, layout: torch.Tensor, device: torch.device) -> bool:
    """Whether ``layout`` reads back random weights of several tiles exactly."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randint(0, 16, (3 * TILE_N, 3 * TILE_K), generator=gen, dtype=torch.int32).to(device)
    return torch.equal(unpack(pack(q), layout, *q.shape), q)


@functools.cache
def tinygemm_layout(device: str) -> torch.Tensor | None:
    """The learned and self-tested layout of ``_convert_weight_to_int4pack`` on ``device`` (None: unusable)."""
    def pack(q: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack(int4_pack_nibbles(q), INT4_INNER_K_TILES)

    dev = torch.device(device)
    try:
        layout = learn_layout(pack, dev)
        ok = layout is not None and self_test(pack, layout, dev)
    except RuntimeError as exc:  # no CUDA int4 packing here
        log.warning("tinygemm layout probe failed (%s): int4 uses tinygemm for every row count", exc)
        return None
    if not ok:
        log.warning("tinygemm's packed layout differs from the learned one: int4 uses tinygemm for every row count")
        return None
    return layout
