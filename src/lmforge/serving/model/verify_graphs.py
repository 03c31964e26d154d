"""Speculative decoding's verify step captured as CUDA graphs, one per batch-size bucket.

A verify forward (``PagedBackend.verify``) feeds each sequence its pending token and up to ``k``
guesses, ``width = k + 1`` tokens, and wants the logits of all of them. Run eagerly it costs two to
three plain decode steps on a GPU (hundreds of kernel launches from Python, measured 324 against
666 tok/s on an H200 with nothing accepted), which eats the gain of the accepted guesses. Its
shape is fixed per server once every sequence gets exactly ``width`` token slots, so it can be
captured like the decode step (``model/graphs.py``).

The layout (:class:`VerifyBatch`): sequence ``i`` owns token slots ``i * width .. i * width +
width - 1`` and one attention query block (``tokens_per_block = width``) whose token count
(``blk_n``) is its run's real length. A run shorter than ``width`` (the proposer found fewer
guesses, or a sequence rides along with its pending token only) fills the rest of its slots with
padding tokens of the cache's scratch row at positions 0, 1, ...: their keys and values land in the
scratch block (where ``rope_store`` writes them; an attention kernel that stores keys itself writes
only a block's real tokens), never in a real sequence's blocks (a real row's blocks past the reservation may
belong to another sequence), and the attention kernel skips them (beyond ``blk_n``). Batch slots
beyond the sequences are whole padding blocks of the scratch row with one token each. Every slot's
logits are computed; the caller gets views of the real ones.

The graphs have their own memory pool rather than the decode graphs': with a shared pool one
graph's replay may overwrite the other's output buffer, which would make the engine's order of
consuming logits a hidden rule of this module. The pool costs little (the largest bucket's
activations and ``max_batch * width`` rows of logits).

Only CUDA captures; the layout itself is plain tensors, and on CPU the same :class:`VerifyBatch`
runs eagerly through the PyTorch ops (it carries the host plan they need), which is how its
padding is tested without a GPU.
"""

from __future__ import annotations

import torch

from lmforge.serving.model.graphs import buckets, capture
from lmforge.serving.model.ops import StepLayout
from lmforge.serving.model.runner import LlamaRunner
from lmforge.serving.model.transfer import pinned


def verify_inputs(rows: list[int], positions: list[int], runs: list[list[int]], width: int, bucket: int,
                  scratch_row: int) -> tuple[list[list[int]], list[list[int]]]:
    """The host values of a verify step's static buffers: ``[tokens, positions, rows]`` of
    ``bucket * width`` token slots and ``[blk_row, blk_n]`` of ``bucket`` query blocks, for
    ``runs[i]`` fed from ``positions[i]`` in cache row ``rows[i]`` (the rest padding, as the module
    docstring says)."""
    if len(runs) > bucket:
        raise ValueError(f"{len(runs)} sequences do not fit a verify bucket of {bucket}")
    tokens: list[int] = []
    pos: list[int] = []
    cache_rows: list[int] = []
    blk_row: list[int] = []
    blk_n: list[int] = []
    for row, start, run in zip(rows, positions, runs):
        if not 1 <= len(run) <= width:
            raise ValueError(f"a verify run of {len(run)} tokens does not fit {width} slots")
        pad = width - len(run)
        tokens.extend([*run, *[0] * pad])
        pos.extend([*range(start, start + len(run)), *range(pad)])
        cache_rows.extend([row] * len(run) + [scratch_row] * pad)
        blk_row.append(row)
        blk_n.append(len(run))
    for _ in range(bucket - len(runs)):  # whole padding sequences: one scratch token of attention each
        tokens.extend([0] * width)
        pos.extend(range(width))
        cache_rows.extend([scratch_row] * width)
        blk_row.append(scratch_row)
        blk_n.append(1)
    return [tokens, pos, cache_rows], [blk_row, blk_n]


class VerifyBatch:
    """Static device buffers of verify steps of up to ``max_batch`` sequences x ``width`` tokens."""

    def __init__(self, max_batch: int, width: int, scratch_row: int, device: torch.device) -> None:
        self.width, self.max_batch, self.scratch_row = width, max_batch, scratch_row
        self.ids = torch.zeros((3, max_batch * width), dtype=torch.long, device=device)
        self.blocks = torch.zeros((2, max_batch), dtype=torch.int32, device=device)
        self.blk_tok = torch.arange(0, max_batch * width, width, dtype=torch.int32, device=device)
        self.layouts = {b: self._layout(b) for b in buckets(max_batch)}
        self.fill([], [], [], max_batch)  # capture's warm-up forwards write only to the scratch block

    def _layout(self, b: int) -> StepLayout:
        t = b * self.width
        return StepLayout(self.ids[0, :t], self.ids[1, :t], self.ids[2, :t], self.blocks[0, :b], self.blk_tok[:b],
                          self.blocks[1, :b], self.width, None, None, decode_step=True)

    def bucket(self, n: int) -> int:
        return next(size for size in self.layouts if size >= n)

    def fill(self, rows: list[int], positions: list[int], runs: list[list[int]], b: int) -> StepLayout:
        """Copy a step's values into the buffers (two host-to-device copies); the layout of bucket ``b``."""
        ids, blocks = verify_inputs(rows, positions, runs, self.width, b, self.scratch_row)
        t = b * self.width
        # Pinned and asynchronous: a plain host copy would wait for a decode step launched ahead (transfer.py).
        self.ids[:, :t].copy_(pinned(ids, torch.long, self.ids.device), non_blocking=True)
        self.blocks[:, :b].copy_(pinned(blocks, torch.int32, self.blocks.device), non_blocking=True)
        layout = self.layouts[b]
        # The PyTorch ops' attention needs the host plan (Triton's does not, and a graph never reads it).
        layout.plan = [(row, i * self.width, len(run), start + len(run))
                       for i, (row, start, run) in enumerate(zip(rows, positions, runs))]
        layout.dense = None  # the PyTorch attention's indices are per step
        return layout

    def split(self, logits: torch.Tensor, runs: list[list[int]]) -> list[torch.Tensor]:
        """Each run's rows of ``logits`` ([b * width, vocab]): views, valid until the buffer is written again."""
        return [logits[i * self.width : i * self.width + len(run)] for i, run in enumerate(runs)]


class VerifyGraphs:
    """The runner's verify forward captured for each batch-size bucket (CUDA only)."""

    def __init__(self, runner: LlamaRunner, max_batch: int, width: int) -> None:
        self.runner = runner
        self.batch = VerifyBatch(max_batch, width, runner.cache.scratch_row, runner.embed.device)
        self.graphs, self.outputs = self._capture()

    def _capture(self) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
        # Its own pool (see the module docstring); Triton compiles the attention for TOK = width in the warm-up.
        return capture(self.runner, self.batch.layouts)

    def fits(self, runs: list[list[int]]) -> bool:
        return len(runs) <= self.batch.max_batch and all(1 <= len(run) <= self.batch.width for run in runs)

    def run(self, rows: list[int], positions: list[int], runs: list[list[int]]) -> list[torch.Tensor]:
        """Logits of every token of each run (``positions`` already shifted past any virtual tokens);
        views of the graph's output, valid until the next call."""
        b = self.batch.bucket(len(runs))
        self.batch.fill(rows, positions, runs, b)
        self.graphs[b].replay()
        return self.batch.split(self.outputs[b], runs)
