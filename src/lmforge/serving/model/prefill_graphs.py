"""A lone prompt's prefill chunk captured as CUDA graphs, one per token-count bucket.

Prefill chunks run eagerly (their shapes vary), and launched one by one from Python a short one is
bound by the host: a 256-token prompt of a 1.1B Llama is ~220 launches, about 8-10 ms to its first
token on an H100 (``bench.serve.gpu``: ``engine_1_stream_ttft_ms``) against ~1.5 ms of GPU work. The
engine prefills in a forward of its own, so a request that arrives alone, or while others decode,
is a prefill of one prompt: that case is padded to the next bucket (:data:`BUCKETS`) and replayed.
Longer chunks keep running eagerly; there the GPU's work outlasts the launches.

The layout of bucket ``B`` (:class:`PrefillBatch`), with ``Q`` tokens per attention query block (the
prefill block): token slots ``0 .. B - 1``, the chunk's ``T`` tokens first at their positions in
their cache row, then padding tokens of the cache's scratch row at positions 0, 1, ... (their keys
and values land in the scratch block, as the verify graphs' padding does); ``ceil(B / Q)`` query
blocks, ``ceil(T / Q)`` of the chunk (the last holding the rest of its tokens) and then padding
blocks of one scratch token each (block ``j`` starts at slot ``j Q``, past the chunk). The graph's output is the logits of the
chunk's last token only (``logit_index``, a device buffer), which is all a prompt's chunk needs
unless the request echoes prompt logprobs (then it runs eagerly).

The graphs have their own memory pool, as the verify graphs do: a decode step launched ahead keeps
its logits in the decode graphs' output buffer while the next step's prefill runs. On CPU the
same :class:`PrefillBatch` runs eagerly through the PyTorch ops (it carries their host plan), which
is how its padding is tested without a GPU.
"""

from __future__ import annotations

import torch

from lmforge.serving.model.graphs import capture
from lmforge.serving.model.ops import StepLayout
from lmforge.serving.model.runner import LlamaRunner
from lmforge.serving.model.transfer import pinned

# Token counts of the captured prefills: a chunk pads to the next one (at most half its compute is padding,
# and at these sizes the GPU's share is small). Up to 512: a 1.1B model's prefill of 1,024 tokens already keeps
# the GPU busier than its launches keep the host.
BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512)


def prefill_buckets(max_tokens: int) -> list[int]:
    """The buckets a server captures: at most ``max_tokens`` (its chunk size and context window)."""
    return [b for b in BUCKETS if b <= max_tokens]


def prefill_inputs(row: int, start: int, ids: list[int], bucket: int, block: int,
                   scratch_row: int) -> tuple[list[list[int]], list[list[int]]]:
    """The host values of a bucket's static buffers: ``[tokens, positions, rows]`` of ``bucket`` token slots
    and ``[blk_row, blk_n]`` of ``ceil(bucket / block)`` query blocks, for ``ids`` fed from ``start`` in
    cache row ``row`` (the rest padding, as the module docstring says)."""
    n = len(ids)
    if not 1 <= n <= bucket:
        raise ValueError(f"a prefill chunk of {n} tokens does not fit a bucket of {bucket}")
    pad = bucket - n
    real = -(-n // block)
    blocks = -(-bucket // block)
    tokens = [*ids, *[0] * pad]
    positions = [*range(start, start + n), *range(pad)]
    rows = [row] * n + [scratch_row] * pad
    blk_row = [row] * real + [scratch_row] * (blocks - real)
    blk_n = [min(block, n - i * block) for i in range(real)] + [1] * (blocks - real)
    return [tokens, positions, rows], [blk_row, blk_n]


class PrefillBatch:
    """Static device buffers of one-prompt prefill chunks of up to ``max(buckets)`` tokens."""

    def __init__(self, buckets: list[int], block: int, scratch_row: int, device: torch.device) -> None:
        self.buckets, self.block, self.scratch_row = buckets, block, scratch_row
        largest = buckets[-1]
        self.ids = torch.zeros((3, largest), dtype=torch.long, device=device)
        self.blocks = torch.zeros((2, -(-largest // block)), dtype=torch.int32, device=device)
        self.blk_tok = torch.arange(0, largest, block, dtype=torch.int32, device=device)
        self.logit_index = torch.zeros(1, dtype=torch.long, device=device)
        self.layouts = {b: self._layout(b) for b in buckets}
        for b in buckets:  # capture's warm-up forwards then write only to the scratch block
            self.fill(scratch_row, 0, [0], b)

    def _layout(self, b: int) -> StepLayout:
        nb = -(-b // self.block)
        return StepLayout(self.ids[0, :b], self.ids[1, :b], self.ids[2, :b], self.blocks[0, :nb], self.blk_tok[:nb],
                          self.blocks[1, :nb], self.block, self.logit_index, None)

    def bucket(self, n: int) -> int:
        return next(size for size in self.buckets if size >= n)

    def fill(self, row: int, start: int, ids: list[int], b: int) -> StepLayout:
        """Copy a chunk's values into the buffers (three host-to-device copies); the layout of bucket ``b``."""
        ids_rows, blocks = prefill_inputs(row, start, ids, b, self.block, self.scratch_row)
        device = self.ids.device
        # Pinned and asynchronous: a plain host copy would wait for a decode step launched ahead (transfer.py).
        self.ids[:, :b].copy_(pinned(ids_rows, torch.long, device), non_blocking=True)
        self.blocks[:, : -(-b // self.block)].copy_(pinned(blocks, torch.int32, device), non_blocking=True)
        self.logit_index.copy_(pinned([len(ids) - 1], torch.long, device), non_blocking=True)
        layout = self.layouts[b]
        # The PyTorch ops' attention needs the host plan (Triton's does not, and a graph never reads it).
        layout.plan = [(row, 0, len(ids), start + len(ids))]
        layout.dense = None  # the PyTorch attention's indices are per step
        return layout


class PrefillGraphs:
    """The runner's one-prompt prefill captured for each of ``buckets`` (``prefill_buckets``; CUDA only)."""

    def __init__(self, runner: LlamaRunner, block: int, buckets: list[int]) -> None:
        self.runner = runner
        self.batch = PrefillBatch(buckets, block, runner.cache.scratch_row, runner.embed.device)
        # Its own pool (see the module docstring); Triton compiles each bucket's attention split in the warm-up.
        self.graphs, self.outputs = capture(runner, self.batch.layouts)
        self.replays = 0  # prefills served from the graphs (reports: bench.serve.gpu_check's paths)

    def fits(self, tokens: int) -> bool:
        return 1 <= tokens <= self.batch.buckets[-1]

    def run(self, row: int, start: int, ids: list[int]) -> torch.Tensor:
        """Logits ``[1, vocab]`` of the chunk's last token (``start`` already shifted past any virtual
        tokens); a view of the graph's output, valid until the next call."""
        b = self.batch.bucket(len(ids))
        self.batch.fill(row, start, ids, b)
        self.graphs[b].replay()
        self.replays += 1
        return self.outputs[b]
