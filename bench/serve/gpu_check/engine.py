"""Running the engine for ``bench.serve.gpu_check``: requests queued as one schedule, every step's logits kept."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from pathlib import Path

import torch

from bench.serve.gpu_check.models import NEW, Out, merged_model
from lmforge.config.serving import KVCacheConfig, SchedulerConfig, ServingConfig
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.requests import CompletionCollector

CFG = ServingConfig(scheduler=SchedulerConfig(max_batch_size=8, max_prefill_tokens=32, max_queue=64),
                    kv_cache=KVCacheConfig(block_size=16, memory_mb=64), max_new_tokens=64)


class Recorder:
    """Keeps the logits of every prefill end and decode step of ``engine``'s backend, per request.

    Wraps the backend's own methods on the instance (restored by :meth:`detach`); clones stay on the
    device until the end, so recording adds no host sync to the decode loop."""

    def __init__(self, engine: Engine, prompts: list[list[int]]) -> None:
        self.backend, self.prompts = engine.backend, prompts
        self.slot: dict[int, int] = {}  # cache row -> LoRA slot
        self.owner: dict[int, tuple[int, int]] = {}  # cache row -> (slot, prompt index)
        self.steps: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        prefill, decode, set_adapter = self.backend.prefill, self.backend.decode, self.backend.set_adapter

        def on_set_adapter(row: int, slot: int) -> None:
            self.slot[row] = slot
            set_adapter(row, slot)

        def on_prefill(items):
            outs = prefill(items)
            for item, rows in zip(items, outs):
                if item.start == 0:
                    index = next(j for j, p in enumerate(prompts) if p[: len(item.ids)] == item.ids)
                    self.owner[item.row] = (self.slot.get(item.row, 0), index)
                key = self.owner[item.row]
                if item.start + len(item.ids) == len(prompts[key[1]]):
                    self.steps.setdefault(key, {})[0] = rows[-1].float().clone()
            return outs

        def on_decode(rows, positions, tokens):
            out = decode(rows, positions, tokens)
            copy = out.float().clone()
            for i, (row, position) in enumerate(zip(rows, positions)):
                key = self.owner[row]
                self.steps[key][position - len(prompts[key[1]]) + 1] = copy[i]
            return out

        self.backend.prefill, self.backend.decode, self.backend.set_adapter = on_prefill, on_decode, on_set_adapter

    def detach(self) -> None:
        for name in ("prefill", "decode", "set_adapter"):
            delattr(self.backend, name)

    def logits(self, slot: int, index: int) -> list[torch.Tensor]:
        steps = self.steps[(slot, index)]
        return [steps[k].cpu() for k in range(len(steps))]


def serve(engine: Engine, prompts: list[list[int]], requests: list[tuple[int, str | None]],
          new: int = NEW) -> list[Out]:
    """Greedy completions of ``requests`` ((prompt index, adapter name or None)), ``new`` tokens each,
    with every step's logits."""
    greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    recorder = Recorder(engine, prompts)
    collector = CompletionCollector(len(requests))
    try:
        # Admitted all at once, in this order, so a run's schedule does not depend on thread timing.
        with engine.admission_held():
            for i, (index, adapter) in enumerate(requests):
                engine.submit(prompts[index], greedy, collector.sink(i), bounded=False, adapter=adapter)
        results = collector.wait(timeout_s=300)
    finally:
        recorder.detach()
    outs = []
    for result, (index, adapter) in zip(results, requests):
        slot = engine.adapters.get(adapter, 0) if adapter else 0
        outs.append(Out(list(result.token_ids), recorder.logits(slot, index)))
    return outs


def engine_paths(engine: Engine) -> dict:
    backend = engine.backend
    graphs = getattr(backend, "graphs", None)
    return {"backend": backend.name, "ops": getattr(getattr(backend, "ops", None), "name", None),
            "cuda_graph_buckets": graphs.buckets if graphs is not None else None,
            "peak_batch": engine.stats["peak_batch"], "prefills": engine.stats["prefills"]}


def with_engine(make: Callable[[], Engine], run: Callable[[Engine], list[Out]]) -> tuple[list[Out], dict]:
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
    paged.pick_ops = lambda device, dtype: Ops()
    try:
        yield
    finally:
        paged.pick_ops = pick
