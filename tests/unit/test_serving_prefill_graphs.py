"""The one-prompt prefill graphs' layout (``model/prefill_graphs.py``), on CPU with a tiny random Llama.

Capturing needs CUDA; the static layout (the chunk's tokens, then padding tokens and query blocks
of the cache's scratch row) runs here eagerly through the same runner, with the PyTorch ops and
(in Triton's interpreter) the Triton kernels, and must give the eager prefill's logits and cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model_dir

from lmforge.config.serving import ServingConfig
from lmforge.serving.backends.base import PrefillItem
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.engine import Engine
from lmforge.serving.model.ops import Ops, TritonOps
from lmforge.serving.model.prefill_graphs import PrefillBatch, prefill_buckets, prefill_inputs


def test_prefill_inputs_pad_with_the_scratch_row() -> None:
    ids, blocks = prefill_inputs(row=3, start=10, ids=[50, 51, 52, 53, 54], bucket=8, block=2, scratch_row=9)
    tokens, positions, rows = ids
    assert tokens == [50, 51, 52, 53, 54, 0, 0, 0]
    assert positions == [10, 11, 12, 13, 14, 0, 1, 2]
    assert rows == [3] * 5 + [9] * 3
    # Query blocks of 2 tokens: three of the chunk (the last holds one), one padding block of one scratch token.
    assert blocks == [[3, 3, 3, 9], [2, 2, 1, 1]]
    # A bucket smaller than, or not a multiple of, the query block: the last block is partly outside the bucket.
    ids, blocks = prefill_inputs(row=3, start=0, ids=[50, 51, 52], bucket=16, block=64, scratch_row=9)
    assert ids[2] == [3] * 3 + [9] * 13 and blocks == [[3], [3]]
    ids, blocks = prefill_inputs(row=3, start=0, ids=[50] * 70, bucket=192, block=128, scratch_row=9)
    assert blocks == [[3, 9], [70, 1]]  # the padding block starts at slot 128, past the chunk
    with pytest.raises(ValueError, match="does not fit a bucket of 4"):
        prefill_inputs(0, 0, [1] * 5, bucket=4, block=2, scratch_row=9)
    assert prefill_buckets(2048) == [16, 32, 64, 128, 192, 256, 384, 512]
    assert prefill_buckets(300) == [16, 32, 64, 128, 192, 256]  # at most the chunk size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-prefill-graphs"))


_OPS = [pytest.param(Ops, id="torch"),
        pytest.param(TritonOps, id="triton", marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton and TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("ops", _OPS)
def test_padded_prefill_layout_gives_the_eager_logits_and_cache(model_dir: Path, ops: type[Ops]) -> None:
    """A prompt's second chunk (it attends to the first, cached) through the padded layout, in a row whose
    first chunk matches another row's: the last token's logits and the chunk's keys and values equal the
    eager prefill's in the other row, and the padding wrote only into the scratch block."""
    engine = Engine.load(model_dir, device="cpu")
    engine.close()  # only its model is needed
    backend = PagedBackend(engine.model, ServingConfig(kv_cache={"block_size": 4}), engine.context_window, ops=ops())
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    first, second = prompt[:6], prompt[6:]
    eager_row, graph_row = (backend.reserve(len(prompt) + 4) for _ in range(2))
    with torch.inference_mode():
        backend.prefill([PrefillItem(eager_row, 0, first), PrefillItem(graph_row, 0, first)])
        want = backend.prefill([PrefillItem(eager_row, 6, second)])[0].clone()
        keys = [k.clone() for k in backend.cache.keys]
        values = [v.clone() for v in backend.cache.values]
        batch = PrefillBatch([8, 16], 4, backend.cache.scratch_row, backend.device)
        b = batch.bucket(len(second))
        assert b == 8  # 5 tokens and 3 of padding: two query blocks of the chunk, no padding block
        got = backend.runner.forward(batch.fill(graph_row, 6, second, b))
        assert got.shape == (1, want.shape[-1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        wide = backend.runner.forward(batch.fill(graph_row, 6, second, 16))  # two padding blocks as well
        torch.testing.assert_close(wide, want, rtol=1e-5, atol=1e-5)
    cache = backend.cache
    eager_slots, graph_slots = cache.slots(eager_row, 6, 11), cache.slots(graph_row, 6, 11)
    kept = torch.ones(cache.keys.shape[1], dtype=torch.bool)
    kept[: cache.block_size] = False  # the scratch block
    kept[graph_slots] = False
    for store, before in ((cache.keys, keys), (cache.values, values)):
        for layer_before, after in zip(before, store):
            torch.testing.assert_close(after[graph_slots], after[eager_slots], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(after[kept], layer_before[kept], rtol=0, atol=0)


class EagerPrefillGraphs:
    """``PrefillGraphs`` without the capture (CUDA only): the same buckets and padded layout, run eagerly, so
    ``PagedBackend.prefill``'s choice of it (a lone prompt's chunk, shifted positions, the cache commit) runs
    on the CPU."""

    def __init__(self, backend: PagedBackend, buckets: list[int]) -> None:
        self.runner = backend.runner
        self.batch = PrefillBatch(buckets, backend.prefill_block, backend.cache.scratch_row, backend.device)
        self.replays = 0

    def fits(self, tokens: int) -> bool:
        return 1 <= tokens <= self.batch.buckets[-1]

    def run(self, row: int, start: int, ids: list[int]) -> torch.Tensor:
        self.replays += 1
        return self.runner.forward(self.batch.fill(row, start, ids, self.batch.bucket(len(ids))))


def test_lone_prompts_take_the_padded_prefill_and_decode_as_before(model_dir: Path) -> None:
    """Requests one at a time, each prefilled through the padded layout (in chunks of 16 tokens, later
    chunks starting at an offset; the second prompt shares the first's cached blocks): greedy tokens and
    cached-token counts equal the engine's with eager prefills."""
    from lmforge.serving.engine import SamplingParams

    cfg = ServingConfig(kv_cache={"block_size": 4}, scheduler={"max_prefill_tokens": 16})
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [list(range(5, 45)), [*range(5, 25), *range(90, 100)]]  # 40 tokens; 30 sharing five blocks

    def serve(padded: bool) -> list[tuple[list[int], int]]:
        engine = Engine.load(model_dir, device="cpu", cfg=cfg)
        try:
            backend = engine.backend
            assert isinstance(backend, PagedBackend) and backend.prefill_graphs is None  # CPU: none captured
            if padded:
                backend.prefill_graphs = EagerPrefillGraphs(backend, [16])  # type: ignore[assignment] - duck-typed
            out = [engine.generate([p], params)[0] for p in prompts]
            if padded:
                assert backend.prefill_graphs.replays == 4  # three chunks of the first prompt, one of the second
            return [(list(o.token_ids), o.cached_tokens) for o in out]
        finally:
            engine.close()

    eager, padded = serve(False), serve(True)
    assert padded == eager
    assert eager[1][1] == 20  # the second prompt found the first's five full blocks cached

