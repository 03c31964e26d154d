"""The training objective: next-token cross-entropy summed over target tokens, fused or plain.

:class:`CausalLMObjective` wraps a causal LM so that its forward returns the summed loss and is the
module DDP wraps (calling a submodule around DDP would skip its gradient bookkeeping). The loop
divides the sum by the number of target tokens of the whole step, across micro-batches and ranks,
so gradient accumulation and DDP give exactly the gradient of one large batch.

The fused path never holds the logits of the whole batch: :class:`FusedLinearCrossEntropy` runs the
output layer and the loss chunk by chunk and computes the gradients of both in the forward pass
(the idea of Liger kernels' fused linear cross-entropy, in plain torch). It needs the hidden
states, so prompt-learning methods (whose peft forward adds virtual tokens) use the plain path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmforge.data.packing import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.model.types import CausalLM

CHUNK_BYTES = 1 << 29  # float32 logits of one chunk: 512 MiB bounds the loss's working memory
# Answer log-probabilities (preference losses) recompute each chunk in the backward and hold its
# float32 logits, their gradient and a bf16 copy at once: about 2.5x a chunk. With gradient
# checkpointing that was the largest single buffer of a 1B model's DPO step, so these chunks are
# four times smaller; at 1024+ rows each, the output-layer products stay large enough to run at speed.
LOGPROB_CHUNK_BYTES = 1 << 27


class CausalLMObjective(torch.nn.Module):
    """``forward(input_ids, labels, attention_mask=None) -> summed loss`` of a causal LM.

    The loop divides the sum by :meth:`units` of the step (its target tokens); an objective with
    ``metric_names`` (:class:`lmforge.train.preference.PreferenceObjective`) returns a vector instead,
    the summed loss first, then one summed value per name, each divided by the same units.
    """

    metric_names: tuple[str, ...] = ()

    def __init__(self, model: CausalLM, label_smoothing: float = 0.0, fused: bool = True,
                 compile_chunks: bool = False, kernel: str = "torch") -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.kernel = kernel
        self.fused = fused and hidden_and_head(model) is not None
        self.chunk_fn = torch.compile(chunk_loss_and_grad, dynamic=False) if compile_chunks else chunk_loss_and_grad

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Targets shifted left by one (the last position predicts nothing): the hidden states
        # keep their layout, so nothing of batch x length x width is copied.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        parts = hidden_and_head(self.model) if self.fused else None  # never None when fused (see __init__)
        if parts is not None:
            decoder, head = parts
            # No KV cache in training: building one per step also makes every block's compiled graph
            # guard on its own cache layer, recompiling once per block.
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            if torch.is_autocast_enabled(hidden.device.type):
                hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
            if self.kernel == "liger":
                return _liger_loss(hidden.flatten(0, 1), head.weight, targets.flatten(), self.label_smoothing)
            with_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
            return FusedLinearCrossEntropy.apply(hidden.flatten(0, 1), head.weight, targets.flatten(),
                                                 self.label_smoothing, self.chunk_fn, with_grad)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # Prompt tuning and P-tuning return logits for their virtual tokens first.
        logits = logits[:, logits.shape[1] - labels.shape[1]:]
        return LogitsCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), self.label_smoothing)


    @staticmethod
    def units(micro: list[dict[str, torch.Tensor]]) -> int:
        """Predicted (non-ignored, shifted) label positions in these micro-batches."""
        return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The same summed loss through Liger kernels' Triton fused linear cross-entropy (CUDA only)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight.to(hidden.dtype), targets, ignore_index=IGNORE_INDEX,
                                            label_smoothing=smoothing, reduction="sum")


def hidden_and_head(model: CausalLM) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder returning hidden states, output layer) of a plain or weight-adapted HF causal LM."""
    inner: torch.nn.Module = model
    if hasattr(model, "peft_config"):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            if model.active_peft_config.is_prompt_learning or model.active_peft_config.peft_type == "ADAPTION_PROMPT":
                return None
            inner = model.get_base_model()
    output_embeddings = getattr(inner, "get_output_embeddings", None)  # transformers models have it
    head = output_embeddings() if output_embeddings is not None else None
    decoder = getattr(inner, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is inner or head.bias is not None:
        return None
    return decoder, head


def summed_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of float32 ``logits`` rows over non-ignored targets, each row's log-sum-exp)."""
    valid = targets != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    per_row = lse - logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    if smoothing:
        # torch's label smoothing: (1-e) * nll + e * mean over classes of -log p.
        per_row = (1 - smoothing) * per_row + smoothing * (lse - logits.mean(dim=-1))
    return torch.where(valid, per_row, 0.0).sum(), lse


class LogitsCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum",
    label_smoothing=e)`` that keeps less for the backward.

    torch's cross-entropy keeps the float32 log-probabilities, twice the size of bf16 logits
    (3.3 GB for GPT-2 at batch 16 x 1024), and its compiled form writes and re-reads them. This
    keeps the logits in their own dtype and one float32 log-sum-exp per row, and writes the
    gradient as one expression, so a compiled graph reads the logits once forward and once
    backward (1.84 ms a GPT-2 step against 2.07 on an H200). Used wherever the loss takes full
    logits: the whole-model compiled objective, prompt-learning methods, ``fused_loss: false``
    and output layers the fused loss cannot take (biased or not ``nn.Linear``).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
        loss, lse = summed_loss(logits.float(), targets, smoothing)
        ctx.save_for_backward(logits, targets, lse)
        ctx.smoothing = smoothing
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        smoothing, vocab = ctx.smoothing, logits.shape[1]
        # softmax - (1 - e) * one-hot - e / V, built in place: one float32 buffer when run eagerly,
        # one pointwise kernel when compiled (in-place ops are functionalized away).
        grad = logits.to(torch.float32, copy=True).sub_(lse[:, None]).exp_()
        hit = torch.arange(vocab, device=logits.device)[None, :] == targets[:, None]  # never for ignored rows
        grad.add_(hit, alpha=-(1 - smoothing))
        if smoothing:
            grad.sub_(smoothing / vocab)
        grad.mul_(((targets != IGNORE_INDEX).float() * grad_out)[:, None])
        return grad.to(logits.dtype), None, None


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, smoothing: float,
                        with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of float32 ``logits`` rows and, if asked, its gradient (in place of the logits)."""
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    loss, lse = summed_loss(logits, targets, smoothing)
    if not with_grad:
        return loss, None
    grad = (logits - lse[:, None]).exp_()
    if smoothing:
        grad.sub_(smoothing / logits.shape[1])
    grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -(1 - smoothing)))
    return loss, grad.mul_(valid[:, None])


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum CE(hidden @ weight.T, targets)`` in row chunks, gradients computed during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, smoothing, chunk_fn, with_grad):
        dtype = hidden.dtype
        w = weight.to(dtype)
        need_h, need_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = _chunk_rows(weight, CHUNK_BYTES)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            loss, grad = chunk_fn((h @ w.T).float(), targets[start:start + rows], smoothing, need_h or need_w)
            total += loss
            if grad is not None:
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start:start + rows] = grad @ w
                if need_w:
                    grad_w += (grad.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def sequence_logps(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_fns: tuple | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, how many there are), float32, shape (rows,).

    Preference losses score whole answers. Through the output layer in chunks
    (:class:`TokenLogProbs`) where the model has one plain head, else from its logits (prompt-learning
    methods, whose logits start with their virtual tokens). ``chunk_fns`` are the compiled
    (forward, backward) chunk functions, if any.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    parts = hidden_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        forward, backward = chunk_fns or (token_logps, token_logps_grad)
        per_token = TokenLogProbs.apply(hidden.flatten(0, 1), head.weight, targets.flatten(), forward, backward)
        per_token = per_token.view_as(targets)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, logits.shape[1] - labels.shape[1]:].float()
        picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        per_token = torch.where(targets != IGNORE_INDEX, picked, 0.0)
    return per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1).float()


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row of float32 ``logits``; 0 where the target is ignored."""
    picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return torch.where(targets != IGNORE_INDEX, picked, 0.0)


def token_logps_grad(logits: torch.Tensor, targets: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(sum of grad_out * log p(target)) / d logits: (one-hot - softmax) * grad_out, 0 on ignored rows."""
    grad = (logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp_().neg_()
    grad.scatter_add_(1, targets.clamp(min=0)[:, None], torch.ones_like(grad[:, :1]))
    return grad.mul_(torch.where(targets != IGNORE_INDEX, grad_out, 0.0)[:, None])


class TokenLogProbs(torch.autograd.Function):
    """log p(target) of each row of ``hidden @ weight.T``, never holding the logits of all rows.

    Unlike the summed loss (:class:`FusedLinearCrossEntropy`), each row's gradient is scaled by a
    weight known only after the whole batch is scored (a pair's preference loss), so the gradient
    cannot be formed in the forward; the backward recomputes each chunk's logits instead (one more
    output-layer product, about 2% of a 1B model's step) rather than keeping them all.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, forward_fn, backward_fn):
        w = weight.to(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        rows = _chunk_rows(weight, LOGPROB_CHUNK_BYTES)
        for start in range(0, hidden.shape[0], rows):
            out[start:start + rows] = forward_fn((hidden[start:start + rows] @ w.T).float(), targets[start:start + rows])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.backward_fn = backward_fn
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = _chunk_rows(weight, LOGPROB_CHUNK_BYTES)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            grad = ctx.backward_fn((h @ w.T).float(), targets[start:start + rows], grad_out[start:start + rows])
            grad = grad.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:start + rows] = grad @ w
            if grad_w is not None:
                grad_w += (grad.T @ h).float()
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None


def _chunk_rows(weight: torch.Tensor, chunk_bytes: int) -> int:
    """Rows per chunk whose float32 logits over ``weight``'s vocabulary fit ``chunk_bytes`` (multiples of 128)."""
    return max(128, chunk_bytes // (4 * weight.shape[0]) // 128 * 128)
