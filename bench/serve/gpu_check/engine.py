"""Running the engine for ``bench.serve.gpu_check``: requests queued as one schedule, every step's logits kept."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from bench.serve.gpu_check.models import NEW, Out, merged_model
from lmforge.config.serving import KVCacheConfig, SchedulerConfig, ServingConfig
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.requests import CompletionCollector

T = TypeVar("T")

CFG = ServingConfig(scheduler=SchedulerConfig(max_batch_size=8, max_prefill_tokens=32, max_queue=64),
                    kv_cache=KVCacheConfig(block_size=16, memory_mb=64), max_new_tokens=64)


class Recorder:
    """Keeps the logits of every prefill end, decode step and speculative verify of ``engine``'s
    backend, per request (the order of ``prompts``: one prompt per submitted request).

    Wraps the backend's own methods on the instance (restored by :meth:`detach`); clones stay on the
    device until the end, so recording adds no host sync to the decode loop. A cache row belongs to
    the request of the k-th ``reserve`` call: the scheduler admits first come, first served, in
    submission order (prompts may then repeat, and a prefill may start after prefix-cache hits)."""

    def __init__(self, engine: Engine, prompts: list[list[int]]) -> None:
        self.backend, self.prompts = engine.backend, prompts
        self.owner: dict[int, int] = {}  # cache row -> request index
        self.reserved = 0
        self.steps: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(len(prompts))}
        reserve, prefill, decode = self.backend.reserve, self.backend.prefill, self.backend.decode
        verify = getattr(self.backend, "verify", None)

        def on_reserve(*args, **kwargs):
            row = reserve(*args, **kwargs)
            self.owner[row], self.reserved = self.reserved, self.reserved + 1
            return row

        def on_prefill(items):
            outs = prefill(items)
            for item, rows in zip(items, outs):
                index = self.owner[item.row]
                if item.start + len(item.ids) == len(prompts[index]):
                    self.steps[index][0] = rows[-1].float().clone()
            return outs

        def keep(rows, positions, logits) -> None:
            # Row j of a run fed at position p predicts the token after p + j. A speculative step's rows
            # past its accepted guesses are rewritten by the next step, which starts there.
            for row, position, block in zip(rows, positions, logits):
                index = self.owner[row]
                for j in range(block.shape[0]):
                    self.steps[index][position + j - len(prompts[index]) + 1] = block[j]

        def on_decode(rows, positions, tokens):
            out = decode(rows, positions, tokens)
            keep(rows, positions, out.float().clone()[:, None])
            return out

        def on_verify(rows, positions, runs):
            outs = verify(rows, positions, runs)
            keep(rows, positions, [o.float().clone() for o in outs])
            return outs

        self.backend.reserve, self.backend.prefill, self.backend.decode = on_reserve, on_prefill, on_decode
        self.wrapped = ["reserve", "prefill", "decode"]
        if verify is not None:
            self.backend.verify = on_verify
            self.wrapped.append("verify")

    def detach(self) -> None:
        for name in self.wrapped:
            delattr(self.backend, name)

    def logits(self, index: int, count: int) -> list[torch.Tensor]:
        steps = self.steps[index]
        return [steps[k].cpu() for k in range(count)]


def serve(engine: Engine, prompts: list[list[int]], requests: list[tuple[int, str | None]],
          new: int = NEW, params: list[SamplingParams] | None = None) -> list[Out]:
    """Completions of ``requests`` ((prompt index, adapter name or None)) with every step's logits:
    greedy, ``new`` tokens each past EOS, unless ``params`` gives each request its own."""
    greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    recorder = Recorder(engine, [prompts[index] for index, _ in requests])
    collector = CompletionCollector(len(requests))
    try:
        # Admitted all at once, in this order, so a run's schedule does not depend on thread timing.
        with engine.admission_held():
            for i, (index, adapter) in enumerate(requests):
                engine.submit(prompts[index], params[i] if params else greedy, collector.sink(i), bounded=False,
                              adapter=adapter)
        results = collector.wait(timeout_s=300)
    finally:
        recorder.detach()
    return [Out(list(r.token_ids), recorder.logits(i, len(r.token_ids)), r.cached_tokens, r.finish_reason, r.text)
            for i, r in enumerate(results)]


def engine_paths(engine: Engine) -> dict:
    backend = engine.backend
    graphs = getattr(backend, "graphs", None)
    prefill_graphs = getattr(backend, "prefill_graphs", None)
    return {"backend": backend.name, "ops": getattr(getattr(backend, "ops", None), "name", None),
            "cuda_graph_buckets": graphs.buckets if graphs is not None else None,
            "peak_batch": engine.stats["peak_batch"], "prefills": engine.stats["prefills"],
            "prefill_graph_replays": prefill_graphs.replays if prefill_graphs is not None else None}


def with_engine(make: Callable[[], Engine], run: Callable[[Engine], T]) -> tuple[T, dict]:
    engine = make()
    try:
        return run(engine), engine_paths(engine)
    finally:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def merged_engine(base: Path, adapter: Path | None, device: str) -> Engine:
    """The adapter merged into the base (``merged_model``), served alone."""
    from transformers import AutoTokenizer

    return Engine(merged_model(base, adapter, device), AutoTokenizer.from_pretrained(base), CFG)


@contextlib.contextmanager
def torch_ops():
    """Engines built inside run the PyTorch ops (the CPU path) even on CUDA: a reference for the
    Triton kernels with everything else (cache dtype, schedule) the same. No CUDA graphs then."""
    from lmforge.serving.backends import paged
    from lmforge.serving.model.ops import Ops

    pick = paged.pick_ops
    paged.pick_ops = lambda *_: Ops()
    try:
        yield
    finally:
        paged.pick_ops = pick
