"""A model that copies, trained inside a benchmark's job: the workload of n-gram speculation.

Random weights copy nothing (measured on an H200: acceptance 0.005 on a prompt that held the
answer), so speculative decoding's benchmark trains a Llama for a time box on a synthetic
copy-and-edit task: ``A SEP A'`` where ``A`` is random tokens and ``A'`` is ``A`` with a few
tokens replaced (``edit_rate``), the loss on ``A'`` only. A model that learned it re-types spans of
its prompt, as a code-editing model asked to rewrite a file does, and the edits teach it that the
copy is not always exact. Tokens of ``A`` come from the first ``task_vocab`` ids past the special
ones (each is then seen often enough for a short run to learn its output row).

Training: AdamW, bf16 autocast on CUDA, linear warm-up then cosine over the time box, gradient
clipping at 1. :func:`copy_accuracy` measures what was learned (teacher forced, no edits).
Needs only torch and transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common.train import train_timed

SEP = 3  # ids 0-2: pad, bos, eos (bench/common/serve.py: random_llama)
FIRST = 4


@dataclass(frozen=True)
class CopyTask:
    span: int  # tokens of A
    task_vocab: int  # A's tokens are ids FIRST .. FIRST + task_vocab - 1
    edit_rate: float = 0.03  # fraction of A' replaced by random tokens in training

    def batch(self, n: int, gen: torch.Generator, device: str, edits: bool = True) -> torch.Tensor:
        """``n`` sequences ``A SEP A'`` ([n, 2 * span + 1])."""
        a = torch.randint(FIRST, FIRST + self.task_vocab, (n, self.span), generator=gen, device=device)
        copy = a.clone()
        if edits:
            where = torch.rand((n, self.span), generator=gen, device=device) < self.edit_rate
            other = torch.randint(FIRST, FIRST + self.task_vocab, (n, self.span), generator=gen, device=device)
            copy = torch.where(where, other, copy)
        sep = torch.full((n, 1), SEP, dtype=a.dtype, device=device)
        return torch.cat([a, sep, copy], dim=1)

    def prompts(self, n: int, lead: int, seed: int) -> list[tuple[list[int], list[int]]]:
        """``n`` (prompt ``A SEP A[:lead]``, the rest of ``A``) pairs, fresh random spans."""
        gen = torch.Generator().manual_seed(seed)
        rows = self.batch(n, gen, "cpu", edits=False).tolist()
        return [(row[: self.span + 1 + lead], row[self.span + 1 + lead :]) for row in rows]


@dataclass
class Trained:
    model: torch.nn.Module
    steps: int
    seconds: float
    loss: float  # on the copy part, last step (nats per token)


def train_copier(model: torch.nn.Module, task: CopyTask, seconds: float, batch: int, lr: float,
                 device: str, max_steps: int | None = None) -> Trained:
    """Train ``model`` (in place, float32 weights) on ``task`` for ``seconds``, or ``max_steps`` steps if fewer."""
    cuda = device.startswith("cuda")
    model.train()
    gen = torch.Generator(device=device).manual_seed(0)
    span = task.span

    def loss_of() -> torch.Tensor:
        seqs = task.batch(batch, gen, device)
        logits = model(seqs[:, :-1]).logits[:, span:]  # predictions of A' (from SEP on)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), seqs[:, span + 1 :].reshape(-1))

    step, took, loss = train_timed(model, loss_of, lr=lr, warm=30, seconds=seconds, cuda=cuda, max_steps=max_steps)
    return Trained(model.eval(), step, took, loss)


@torch.inference_mode()
def copy_accuracy(model: torch.nn.Module, task: CopyTask, n: int, device: str) -> float:
    """Fraction of ``A'`` positions (no edits, teacher forced) where the model's argmax is ``A``'s token."""
    seqs = task.batch(n, torch.Generator(device=device).manual_seed(123), device, edits=False)
    logits = model(seqs[:, :-1]).logits[:, task.span :]
    return float((logits.argmax(-1) == seqs[:, task.span + 1 :]).float().mean())


def deepen(model: torch.nn.Module, depth: int) -> torch.nn.Module:
    """``model`` (a trained Llama) grown to ``depth`` layers by pass-through layers: copies of its last
    layer with the attention output and MLP down projections zeroed, so each adds exactly nothing to the
    residual stream while its forward reads and multiplies every weight a real layer of the shape does.
    The model computes what it learned at the cost of the deeper shape (a deep model trained from
    scratch does not learn to copy within a benchmark's time box)."""
    layers = model.model.layers
    for index in range(len(layers), depth):
        layer = copy.deepcopy(layers[-1])
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
        layer.self_attn.layer_idx = index  # transformers' KV cache is indexed by it
        layers.append(layer)
    model.config.num_hidden_layers = len(layers)
    return model
