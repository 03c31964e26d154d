"""Speculative decoding: propose k tokens cheaply, verify them in one forward, keep the model's distribution.

``serving.speculative`` (``method: ngram | draft``, ``num_tokens``) turns it on. Each decode round,
for the running sequences it applies to (:meth:`Speculator.eligible`), the proposer
(``engine/proposers.py``) guesses up to k tokens; the model then runs the sequence's pending token
and the k guesses as one query block at the sequence's position, the chunked-prefill path of the
paged runner (``PagedBackend.verify``), which yields the model's logits at all k + 1 positions. The
run of tokens kept is chosen by exact rejection sampling (Leviathan et al., 2023,
:func:`accept_run`): guess ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``
(``p``: the model's distribution under the request's temperature, top-k and top-p; ``q``: the
proposer's, a point mass for n-gram guesses); at the first rejection the next token is drawn from
``norm(max(0, p_i - q_i))`` and the rest are dropped; when all are accepted a bonus token is drawn
from ``p_k``. Each emitted token is then distributed exactly as in plain decoding, and greedy
decoding emits the same tokens (accepted iff each guess is the argmax).

Rollback: the paged backend reserves each sequence's worst case at admission, so the keys and
values written for rejected guesses sit in the sequence's own blocks beyond its length; nothing
attends to them (attention stops at each query's position) and the next step overwrites them.
Only prompt blocks are ever content-hashed for prefix caching (``PagedBackend._hashes``), so no
block holding a guess is published. Proposals never run past ``max_tokens``; stop strings and EOS
end the run where they occur (``Scheduler.update_runs``).

Not speculated (decoded plainly in the same step, correct either way): requests with
``logprobs`` (their entries come from the plain step) and requests with a ``response_format``
(the grammar's mask would have to advance through and roll back over the guesses). When no
sequence has a guess, the round is one plain decode step (CUDA graphs included).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from lmforge.config.base import updated
from lmforge.config.serving import ServingConfig, SpeculativeConfig
from lmforge.core.errors import ConfigError
from lmforge.serving.backends.base import Backend
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.engine.metrics import EngineMetrics, NullMetrics
from lmforge.serving.engine.proposers import DraftProposer, NgramProposer, Proposal, Proposer, draw
from lmforge.serving.engine.sampling import filtered_probs
from lmforge.serving.engine.scheduler import Scheduler
from lmforge.serving.engine.sequence import Sequence
from lmforge.serving.model.loading import load_model
from lmforge.serving.model.runner import unsupported
from lmforge.serving.model.types import LlamaCausalLM, ServedModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def accept_run(target: torch.Tensor, proposal: Proposal, rng: random.Random) -> tuple[list[int], int]:
    """The tokens to emit after verifying ``proposal`` against ``target`` ([m + 1, vocab]: the model's
    sampling distribution at each guess's position and one past the last), and how many guesses were
    accepted. Always one token more than the accepted guesses: the correction or the bonus."""
    guesses = proposal.tokens
    q = None if proposal.probs is None else proposal.probs.to(target.device)
    for i, x in enumerate(guesses):
        p = target[i]
        q_x = 1.0 if q is None else float(q[i, x])
        if q_x > 0 and rng.random() < float(p[x]) / q_x:
            continue
        if q is None:
            residual = p.clone()
            residual[x] = 0.0
        else:
            residual = (p - q[i]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # only when p == q up to rounding, where the guess is always accepted
            residual = p
        return [*guesses[:i], draw(residual[None], [rng])[0]], i
    return [*guesses, draw(target[len(guesses)][None], [rng])[0]], len(guesses)


class Speculator:
    """Runs the speculative decode round for the sequences it applies to."""

    def __init__(self, cfg: SpeculativeConfig, backend: PagedBackend, proposer: Proposer,
                 metrics: EngineMetrics | NullMetrics) -> None:
        self.k = cfg.num_tokens
        self.backend = backend
        self.proposer = proposer
        self.metrics = metrics
        self.stats = {"proposed": 0, "accepted": 0, "verify_steps": 0}

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        return seq.grammar is None and seq.params.logprobs is None

    def run(self, running: list[Sequence], scheduler: Scheduler) -> list[Sequence]:
        """Step the eligible ones of ``running`` and hand their runs to ``scheduler``; the others are returned."""
        seqs = [s for s in running if self.eligible(s)]
        if seqs:
            scheduler.update_runs(seqs, self.step(seqs))
            self.proposer.retain(scheduler.running)  # the finished ones give their draft cache back now
        return [s for s in running if not self.eligible(s)]

    def step(self, seqs: list[Sequence]) -> list[list[int]]:
        """Propose, verify in one forward, accept: the run of tokens each of ``seqs`` emits this step."""
        self.proposer.retain(seqs)
        # Never guess past max_tokens: the last of a run is the correction or bonus token.
        limits = [max(0, min(self.k, s.params.max_tokens - len(s.token_ids) - 1)) for s in seqs]
        proposals = self.proposer.propose(seqs, limits)
        if any(p.tokens for p in proposals):
            runs = [[s.next_token, *p.tokens] for s, p in zip(seqs, proposals)]
            logits = self.backend.verify([s.row for s in seqs], [s.position for s in seqs], runs)
            self.stats["verify_steps"] += 1
        else:  # nothing to verify: one plain decode step (CUDA graphs where captured)
            logits = list(self.backend.decode([s.row for s in seqs], [s.position for s in seqs],
                                              [s.next_token for s in seqs])[:, None])
        out: list[list[int]] = []
        counts: list[int] = []
        for seq, proposal, rows in zip(seqs, proposals, self._targets(seqs, proposals, logits)):
            if isinstance(rows, list):  # greedy: accepted while each guess is the model's argmax
                n = next((i for i, x in enumerate(proposal.tokens) if x != rows[i]), len(proposal.tokens))
                run = [*proposal.tokens[:n], rows[n]]
            else:
                run, n = accept_run(rows, proposal, seq.rng)
            out.append(run)
            counts.append(n)
        self.proposer.accepted(seqs, counts)
        proposed, accepted = sum(len(p.tokens) for p in proposals), sum(counts)
        self.stats["proposed"] += proposed
        self.stats["accepted"] += accepted
        if proposed:
            self.metrics.speculative(proposed, accepted)
        return out

    @staticmethod
    def _targets(seqs: list[Sequence], proposals: list[Proposal],
                 logits: list[torch.Tensor]) -> list[list[int] | torch.Tensor]:
        """Per sequence, the model's argmax tokens (greedy) or its sampling distributions on the CPU
        ([m + 1, vocab]); one device sync for all of them."""
        flat = torch.cat(logits)
        sizes = [len(rows) for rows in logits]
        greedy = flat.argmax(dim=-1).tolist()
        params = [s.params for s, n in zip(seqs, sizes) for _ in range(n)]
        sampled = any(s.params.temperature > 0 for s in seqs)
        probs = filtered_probs(flat, params).cpu() if sampled else None
        out: list[list[int] | torch.Tensor] = []
        start = 0
        for seq, n in zip(seqs, sizes):
            out.append(probs[start : start + n] if probs is not None and seq.params.temperature > 0
                       else greedy[start : start + n])
            start += n
        return out


def make_speculator(cfg: ServingConfig, backend: Backend, model: ServedModel, tokenizer: PreTrainedTokenizerBase,
                    context_window: int, metrics: EngineMetrics | NullMetrics) -> Speculator | None:
    """The speculator ``cfg.speculative`` asks for (None when off); :class:`ConfigError` when it cannot run."""
    spec = cfg.speculative
    if spec.method == "none":
        return None
    if not isinstance(backend, PagedBackend):
        raise ConfigError(f"speculative decoding runs on the paged engine; this model is served by the {backend.name} "
                          "backend", "set serving.speculative.method: none, or serve a Llama-family model with "
                          "serving.runtime.engine: paged")
    if spec.method == "ngram":
        return Speculator(spec, backend, NgramProposer(spec.ngram_min, spec.ngram_max), metrics)
    return Speculator(spec, backend, DraftProposer(draft_backend(cfg, model, tokenizer, context_window)), metrics)


def draft_backend(cfg: ServingConfig, model: ServedModel, tokenizer: PreTrainedTokenizerBase,
                  context_window: int) -> PagedBackend:
    """The draft model of ``cfg.speculative.draft_model`` on its own paged backend, on the served model's device."""
    source = cfg.speculative.draft_model or ""
    if source.startswith("models:/"):
        raise ConfigError(f"the draft model {source} is a registry URI, which only `lmforge serve` resolves",
                          "serve with `lmforge serve` (it resolves serving.speculative.draft_model), or name the "
                          "draft's model directory")
    draft, draft_tokenizer = load_model(Path(source).expanduser(), str(model.device))
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the draft model {source} has another tokenizer than the served model (their vocabularies "
                          "differ), so its guesses are not the served model's tokens",
                          "pick a draft model trained with the served model's tokenizer")
    reason = unsupported(draft)
    if reason:
        raise ConfigError(f"the draft model {source} cannot run on the paged engine: {reason}",
                          "pick a Llama-family draft model, or use serving.speculative.method: ngram")
    # Its own cache for every row of the batch at full length, no prefix caching (drafts are cheap to prefill).
    draft_cfg = updated(ServingConfig(), scheduler={"max_batch_size": cfg.scheduler.max_batch_size},
                        kv_cache={"block_size": cfg.kv_cache.block_size, "prefix_caching": False},
                        runtime={"cuda_graphs": cfg.runtime.cuda_graphs})
    log.info("speculative decoding with the draft model %s (%d tokens per step)", source, cfg.speculative.num_tokens)
    return PagedBackend(cast(LlamaCausalLM, draft), draft_cfg, context_window)  # unsupported() checked its shape
