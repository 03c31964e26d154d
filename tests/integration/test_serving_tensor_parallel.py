"""The paged runner split over tensor-parallel ranks (``serving/model/tensor_parallel.py``), on gloo.

Two real processes (torch.multiprocessing, a gloo process group on loopback) each cut the runner of a
tiny random Llama (4 query heads, 2 key/value heads: one of each pair per rank) and its KV cache to
their half, then run a prefill chunk and two decode steps over their own caches; this process runs the
same steps on one unsplit runner. The logits must agree: the split changes where the weights live and
adds the all-reduces, never what a step computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo import spawn_gloo
from helpers import make_tiny_model_dir

from lmforge.serving.model.kv_cache import CacheShape, PagedKVCache
from lmforge.serving.model.ops import Ops, StepLayout
from lmforge.serving.model.runner import LlamaRunner, head_dim
from lmforge.serving.model.tensor_parallel import TensorParallel, shard, unshardable

WORLD, BLOCK, MAX_LEN = 2, 4, 64
PROMPT = [5, 17, 42, 9, 88, 3, 61, 25, 7, 14, 99]


def _steps(model_dir: Path, tp: TensorParallel | None) -> list[torch.Tensor]:
    """The logits of a 11-token prefill (every token's) and of two decode steps, on this rank's runner."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    world = tp.world if tp is not None else 1
    shape = CacheShape(config.num_hidden_layers, config.num_key_value_heads // world, head_dim(config), BLOCK,
                       torch.float32)
    cache = PagedKVCache(shape, num_blocks=40, max_rows=2, max_len=MAX_LEN, device=torch.device("cpu"))
    runner = LlamaRunner(model, cache, Ops(), MAX_LEN)
    if tp is not None:
        shard(runner, model, tp)
    row = cache.reserve(len(PROMPT) + 2)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        out = [runner.forward(StepLayout.build([(row, 0, PROMPT)], cpu, BLOCK, None))]
        for i, token in enumerate((31, 47)):
            layout = StepLayout.build([(row, len(PROMPT) + i, [token])], cpu, 1, None, decode=True)
            out.append(runner.forward(layout))
    return out


def _rank(rank: int, world: int, model_dir: Path) -> list[torch.Tensor]:
    return _steps(model_dir, TensorParallel(rank, world))


@pytest.mark.slow  # two spawned processes that import torch and transformers: ~15 s on a busy 2-core machine
def test_split_runner_gives_the_unsplit_logits(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "model")
    split = spawn_gloo(_rank, WORLD, tmp_path / "out.pt", model_dir, label="tensor-parallel serving runner")
    whole = _steps(model_dir, None)
    assert len(split) == len(whole) == 3
    for got, want in zip(split, whole):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unshardable_names_the_part_that_does_not_split(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path / "model"), dtype=torch.float32)
    assert unshardable(model, 2) is None
    assert unshardable(model, 3) == "4 attention heads do not split over 3 ranks"
    assert unshardable(model, 4) == "2 key/value heads do not split over 4 ranks"
