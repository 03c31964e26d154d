"""The paged engine's decode step captured as CUDA graphs, one per batch-size bucket.

A decode step of a 1B model is a few hundred small kernels; launched one by one from Python the
GPU idles between them, replayed from a graph it does not. The step's inputs (token, position and
cache row of each sequence) live in one static device buffer ``[3, max_bucket]``; a step copies its
values in with one asynchronous host-to-device copy (the tokens may come straight from the device)
and replays the graph of the smallest bucket that fits, padding the extra rows with the cache's
scratch row (which points only at the scratch block, so padded rows never touch a real sequence's
cache). All graphs share one memory pool and are
captured largest first, so together they need about the memory of the largest.
"""

from __future__ import annotations

import torch

from lmforge.serving.model.ops import StepLayout
from lmforge.serving.model.runner import LlamaRunner
from lmforge.serving.model.transfer import pinned


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64 and of 16 beyond, ending at ``max_batch``."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    size = 8
    while size < max_batch:
        sizes.append(size)
        size += 8 if size < 64 else 16
    return [*sizes, max_batch]


@torch.inference_mode()
def capture(runner: LlamaRunner, layouts: dict[int, StepLayout]) -> tuple[dict[int, torch.cuda.CUDAGraph],
                                                                           dict[int, torch.Tensor]]:
    """The runner's forward over each layout (by bucket: a batch size, or a prefill's token count) captured
    as a CUDA graph, and its output buffer. Largest first, in one memory pool: the smaller graphs reuse
    the largest's memory."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = None
    side = torch.cuda.Stream()
    for b in sorted(layouts, reverse=True):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, cuBLAS picks kernels
            for _ in range(2):
                runner.forward(layouts[b])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[b] = runner.forward(layouts[b])
        pool = graph.pool()
        graphs[b] = graph
    torch.cuda.synchronize()
    return graphs, outputs


class DecodeGraphs:
    def __init__(self, runner: LlamaRunner, max_batch: int) -> None:
        self.runner = runner
        self.buckets = buckets(max_batch)
        device = runner.embed.device
        largest = self.buckets[-1]
        self.inputs = torch.zeros((3, largest), dtype=torch.long, device=device)
        self.inputs[2].fill_(runner.cache.scratch_row)
        self._blk_tok = torch.arange(largest, dtype=torch.int32, device=device)
        self._blk_n = torch.ones(largest, dtype=torch.int32, device=device)
        self._pad = [0, 0, runner.cache.scratch_row]
        self.graphs, self.outputs = self._capture()

    def _layout(self, b: int) -> StepLayout:
        tokens, positions, rows = self.inputs[0, :b], self.inputs[1, :b], self.inputs[2, :b]
        return StepLayout(tokens, positions, rows, rows, self._blk_tok[:b], self._blk_n[:b], 1, None, None,
                          decode_step=True)

    def _capture(self) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
        return capture(self.runner, {b: self._layout(b) for b in self.buckets})

    def fits(self, n: int) -> bool:
        return n <= self.buckets[-1]

    def run(self, tokens: list[int] | torch.Tensor, positions: list[int], rows: list[int]) -> torch.Tensor:
        """Logits ``[n, vocab]`` of one decode step; valid until the next call.

        ``tokens`` may be a device tensor (the previous step's choice, still being computed): it is
        copied on the device, in stream order, so the step is launched without waiting for it. The
        host values go through pinned memory (``model/transfer.py``): no call here waits for the GPU."""
        n = len(rows)
        b = next(size for size in self.buckets if size >= n)
        pad = b - n
        device = self.inputs.device
        if isinstance(tokens, torch.Tensor):
            self.inputs[0, :n].copy_(tokens)  # padded rows keep earlier ids: valid tokens, in the scratch row
            host = pinned([positions + [self._pad[1]] * pad, rows + [self._pad[2]] * pad], torch.long, device)
            self.inputs[1:, :b].copy_(host, non_blocking=True)
        else:
            host = pinned([tokens + [self._pad[0]] * pad, positions + [self._pad[1]] * pad,
                           rows + [self._pad[2]] * pad], torch.long, device)
            self.inputs[:, :b].copy_(host, non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b][:n]
