"""Tensor-parallel serving on CPUs: the split runner (``serving/model/tensor_parallel.py``) and the engine
over it (``serving/backends/tensor_parallel.py``), in real processes of a gloo group on loopback.

The runner: two processes each cut the runner of a tiny random Llama (4 query heads, 2 key/value heads:
one of each pair per rank) and its KV cache to their half, then run a prefill chunk and two decode steps
over their own caches; this process runs the same steps on one unsplit runner. The logits must agree:
the split changes where the weights live and adds the all-reduces, never what a step computes.

The engine: ``serving.tensor_parallel: 2`` starts a worker process that repeats the engine's calls; its
greedy tokens must be the one-process engine's, with prefix caching, decode steps launched ahead (their
tokens sent by broadcast) and speculative decoding's verify steps. A killed worker and a model that no
longer matches its config give errors that name the rank and the cause.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import cast

import httpx
import pytest
import torch
from gloo import spawn_gloo
from helpers import make_tiny_model_dir, running

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.backends.base import BackendLost, PrefillItem
from lmforge.serving.backends.tensor_parallel import TensorParallelBackend, rank_devices
from lmforge.serving.engine.engine import Engine, SamplingParams
from lmforge.serving.model.kv_cache import CacheShape, PagedKVCache
from lmforge.serving.model.loading import load_model
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


# Three prompts that share their first 8 tokens (two cache blocks of 4: prefix caching reuses them) and one apart.
SHARED = [5, 17, 42, 9, 88, 3, 61, 25]
PROMPTS = [[*SHARED, 7, 14], [*SHARED, 99, 31, 2], [*SHARED, 40], [11, 12, 13, 14, 15, 11, 12, 13]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def _engine(model_dir: Path, **cfg: object) -> Engine:
    return Engine.load(model_dir, device="cpu", cfg=ServingConfig(
        scheduler={"max_batch_size": 4}, kv_cache={"memory_mb": 1, "block_size": 4}, **cfg))


def _tokens(engine: Engine) -> list[tuple[int, ...]]:
    return [tuple(c.token_ids) for c in engine.generate(PROMPTS, GREEDY)]


@pytest.mark.slow  # spawns two worker processes that import torch and transformers: ~15 s on a busy 2-core machine
def test_split_engine_decodes_the_unsplit_tokens(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "model")
    whole = _engine(model_dir)
    try:
        want = _tokens(whole)
    finally:
        whole.close()
    split = _engine(model_dir, tensor_parallel=2)
    try:
        assert isinstance(split.backend, TensorParallelBackend)
        assert split.backend.local.runner.kv_heads == 1  # this rank's half of the two key/value heads
        assert _tokens(split) == want
        assert _tokens(split) == want  # again: the prompts' shared blocks now come from the prefix cache
        assert split.stats["launched_ahead"] > 0  # decode steps whose tokens went to the worker by broadcast
    finally:
        split.close()
    assert not any(w.process.is_alive() for w in split.backend._workers)
    speculative = _engine(model_dir, tensor_parallel=2, speculative={"method": "ngram", "num_tokens": 3})
    try:
        assert _tokens(speculative) == want  # greedy: the verified tokens are the model's own choices
        assert speculative.speculator is not None and speculative.speculator.stats["verify_steps"] > 0
    finally:
        speculative.close()


@pytest.mark.slow  # two tensor-parallel engines, each with a worker process: ~15 s on a busy 2-core machine
def test_a_dead_rank_and_a_changed_model_are_named(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "model")
    model, tokenizer = load_model(model_dir, "cpu")
    cfg = ServingConfig(tensor_parallel=2, kv_cache={"memory_mb": 1, "block_size": 4})
    engine = Engine(model, tokenizer, cfg)
    try:
        assert isinstance(engine.backend, TensorParallelBackend)
        with running(engine, cfg) as (url, _):
            body = {"model": "tiny", "prompt": "the model", "max_tokens": 4}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
            assert httpx.get(f"{url}/health").status_code == 200
            worker = engine.backend._workers[0]
            os.kill(cast(int, worker.process.pid), signal.SIGKILL)
            worker.process.join(10)
            health = httpx.get(f"{url}/health")  # seen while idle: a supervisor restarts the server from here
            assert health.status_code == 503 and "cannot serve: tensor-parallel rank 1 exited" in health.text
            refused = httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # at once: nothing waits
            assert refused.status_code == 503 and "rank 1 exited (exit code -9)" in refused.text
        # The engine thread's own calls see the dead rank too: releasing never raises (it runs while requests are
        # failed), a forward names the rank.
        engine.backend.release(0)
        with pytest.raises(BackendLost, match=r"tensor-parallel rank 1 exited \(exit code -9\)"):
            engine.backend.prefill([PrefillItem(row=0, start=0, ids=[5, 6, 7])])
    finally:
        engine.close()
    # The split engine freed the model's whole layers: the same object cannot be split again, and says why.
    with pytest.raises(ServingError, match=r"rank 1 failed: .*differs from rank 0's.*changed after loading"):
        Engine(model, tokenizer, cfg)


def test_split_sizes_are_checked_before_any_process_starts(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "model")
    with pytest.raises(ServingError, match="tensor_parallel 4 cannot split this model: 2 key/value heads do not "
                                           "split over 4 ranks") as caught:
        _engine(model_dir, tensor_parallel=4)
    assert "divides the model's attention heads" in caught.value.fix
    assert rank_devices(torch.device("cpu"), 3) == [torch.device("cpu")] * 3


@pytest.mark.parametrize(("extra", "cause"), [
    ({"runtime": {"engine": "hf"}}, "needs the paged engine"),
    ({"adapters": {"a": "/tmp/a"}}, "does not split unmerged LoRA adapters"),
    ({"lora": {"max_loras": 2}}, "does not split unmerged LoRA adapters"),
    ({"runtime": {"quantization": "int8"}}, "does not split quantized weights"),
    ({"platform": "ray", "ray": {"num_gpus": 1}}, "needs 2 GPUs per Ray Serve replica"),
])
def test_config_refuses_what_the_split_does_not_serve(extra: dict[str, object], cause: str) -> None:
    with pytest.raises(ValueError, match=cause):
        ServingConfig(tensor_parallel=2, **extra)
    ServingConfig(tensor_parallel=1, **extra)  # each is fine on one device
