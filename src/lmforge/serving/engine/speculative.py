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
(the grammar's mask would have to advance through and roll back over the guesses).

What a round costs: the verify forward replays a CUDA graph where the backend captured one
(``model/verify_graphs.py``), else it runs eagerly. When no sequence has a guess, the round is the
engine's plain decode step (its CUDA graph); when some have, the others ride along in the verify
with their pending token alone (one forward, not two). Back-off: a sequence whose moving average of
accepted / proposed falls below ``backoff_acceptance`` (its output stopped copying, or the draft
stopped agreeing) makes no guesses for ``backoff_steps`` decode steps, then probes again with a
fresh average; each failed probe doubles the pause (up to 8x). Whether a step is speculated
depends only on what came before it, so each emitted token's distribution is unchanged (greedy:
the same tokens).

Plain rounds are the engine's own decode step, so they overlap as plain decoding does
(``engine/steps.py``): when every running sequence's next round is certainly plain
(:meth:`Speculator.plain_next`: paused past this round, or never speculated), that step is launched
ahead from their tokens on the device, and the round after, :meth:`Speculator.run` counts their
pauses down without asking for guesses. While any sequence may guess next, none is launched ahead:
its proposer must see its latest token first, and the paused ones ride along in its verify.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from lmforge.config.base import updated
from lmforge.config.serving import ServingConfig, SpeculativeConfig
from lmforge.core.errors import ConfigError
from lmforge.serving.backends.base import Backend
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.backends.tensor_parallel import TensorParallelBackend
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

# Back-off: the weight of the latest verify in a sequence's moving acceptance (a few verifies decide), and the
# longest pause as a multiple of backoff_steps (a sequence that stopped copying still probes now and then).
_EMA_WEIGHT = 0.5
_MAX_PAUSE_FACTOR = 8


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


@dataclass
class Backoff:
    """One sequence's back-off state (``serving.speculative.backoff_acceptance`` / ``backoff_steps``)."""

    rate: float | None = None  # moving average of accepted / proposed; None until its first verify (or probe)
    pause: int = 0  # decode steps left without guesses
    length: int = 0  # the next pause's length
    probing: bool = False  # the next verify starts the average afresh (what was seen before the pause is stale)


class Speculator:
    """Runs the speculative decode round for the sequences it applies to."""

    def __init__(self, cfg: SpeculativeConfig, backend: PagedBackend | TensorParallelBackend, proposer: Proposer,
                 metrics: EngineMetrics | NullMetrics) -> None:
        self.k = cfg.num_tokens
        self.threshold, self.base_pause = cfg.backoff_acceptance, cfg.backoff_steps
        self.backend = backend
        self.proposer = proposer
        self.metrics = metrics
        # Keyed by the sequence itself (identity): an entry keeps its sequence alive, so a new sequence never
        # takes over a finished one's state through a reused id() before the entry is pruned.
        self.backoff: dict[Sequence, Backoff] = {}
        # verify_steps: forwards that verified guesses; backoffs: pauses begun; paused_steps: sequence-steps
        # decoded without guesses while paused; plain_rounds: rounds left to the engine's plain decode step.
        self.stats = {"proposed": 0, "accepted": 0, "verify_steps": 0, "backoffs": 0, "paused_steps": 0,
                      "plain_rounds": 0}

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        return seq.grammar is None and seq.params.logprobs is None

    def plain_next(self, seq: Sequence) -> bool:
        """Whether ``seq``'s next decode round is certainly plain, decided now (after this round's
        proposals): it is never speculated, or its pause lasts past this round. The engine may launch
        that round's step ahead (see the module docstring)."""
        if not self.eligible(seq):
            return True
        state = self.backoff.get(seq)
        return state is not None and state.pause > 0

    def run(self, running: list[Sequence], scheduler: Scheduler, launched: list[Sequence]) -> list[Sequence]:
        """Step the sequences of ``running`` that take a verify forward this round and hand their runs
        to ``scheduler``; the others are returned, for the engine's plain decode step. ``launched``:
        those of ``running`` whose plain step was launched ahead (:meth:`plain_next` said so a round
        ago); their pauses count down here, and nobody is asked for their guesses.

        When no eligible sequence has a guess (none found, or all backed off), the round is the
        engine's plain decode step (a CUDA graph's replay, launched ahead where it may be), which
        costs less than a verify forward. When some have guesses, the other eligible sequences ride
        along in the verify with their pending token alone (plain decoding for them) rather than pay
        a second forward."""
        eligible = [s for s in running if self.eligible(s)]
        if not eligible:
            return running
        live = {id(s) for s in running}
        self.backoff = {seq: state for seq, state in self.backoff.items() if id(seq) in live}
        self.proposer.retain(eligible)
        ahead = {id(s) for s in launched}
        self._count_paused([s for s in eligible if id(s) in ahead])
        seqs = [s for s in eligible if id(s) not in ahead]
        proposals = self._propose(seqs) if seqs else []
        if not any(p.tokens for p in proposals):
            self.stats["plain_rounds"] += 1
            return running
        scheduler.update_runs(seqs, self.step(seqs, proposals))
        self.release_finished(scheduler.running)
        stepped = {id(s) for s in seqs}
        return [s for s in running if id(s) not in stepped]

    def release_finished(self, running: list[Sequence]) -> None:
        """Give back the draft cache rows of sequences no longer running (after a step finished some)."""
        self.proposer.retain(running)

    def _propose(self, seqs: list[Sequence]) -> list[Proposal]:
        """Guesses for the sequences not backed off (their pauses count down here); empty for the others."""
        # Never guess past max_tokens: the last of a run is the correction or bonus token.
        limits = [max(0, min(self.k, s.params.max_tokens - len(s.token_ids) - 1)) for s in seqs]
        paused = self._count_paused(seqs)
        limits = [0 if i in paused else k for i, k in enumerate(limits)]
        return self.proposer.propose(seqs, limits)

    def _count_paused(self, seqs: list[Sequence]) -> set[int]:
        """Count down the pauses of ``seqs`` for this round; the indexes of those paused in it."""
        paused = set()
        for i, seq in enumerate(seqs):
            state = self.backoff.setdefault(seq, Backoff(length=self.base_pause))
            if state.pause:
                state.pause -= 1
                paused.add(i)
        self.stats["paused_steps"] += len(paused)
        if paused:
            self.metrics.speculative(0, 0, paused=len(paused))
        return paused

    def step(self, seqs: list[Sequence], proposals: list[Proposal]) -> list[list[int]]:
        """Verify ``proposals`` (some with guesses) in one forward and accept: the run of tokens each
        of ``seqs`` emits."""
        runs = [[s.next_token, *p.tokens] for s, p in zip(seqs, proposals)]
        logits = self.backend.verify([s.row for s in seqs], [s.position for s in seqs], runs)
        self.stats["verify_steps"] += 1
        out: list[list[int]] = []
        counts: list[int] = []
        for seq, proposal, rows in zip(seqs, proposals, self._targets(seqs, logits)):
            if isinstance(rows, list):  # greedy: accepted while each guess is the model's argmax
                n = next((i for i, x in enumerate(proposal.tokens) if x != rows[i]), len(proposal.tokens))
                run = [*proposal.tokens[:n], rows[n]]
            else:
                run, n = accept_run(rows, proposal, seq.rng)
            out.append(run)
            counts.append(n)
        self.proposer.accepted(seqs, counts)
        backoffs = sum(self._observe(seq, len(p.tokens), n) for seq, p, n in zip(seqs, proposals, counts) if p.tokens)
        proposed, accepted = sum(len(p.tokens) for p in proposals), sum(counts)
        self.stats["proposed"] += proposed
        self.stats["accepted"] += accepted
        self.stats["backoffs"] += backoffs
        if proposed:
            self.metrics.speculative(proposed, accepted, backoffs=backoffs)
        return out

    def _observe(self, seq: Sequence, proposed: int, accepted: int) -> bool:
        """Fold one verify's acceptance into ``seq``'s average; True when that starts a pause."""
        state = self.backoff.setdefault(seq, Backoff(length=self.base_pause))
        rate = accepted / proposed
        if state.rate is not None and not state.probing:
            rate = _EMA_WEIGHT * rate + (1 - _EMA_WEIGHT) * state.rate
        state.rate = rate
        state.probing = False
        if state.rate >= self.threshold:
            state.length = self.base_pause  # a later slump starts from the shortest pause again
            return False
        state.pause, state.probing = state.length, True
        state.length = min(2 * state.length, _MAX_PAUSE_FACTOR * self.base_pause)
        return True

    @staticmethod
    def _targets(seqs: list[Sequence], logits: list[torch.Tensor]) -> list[list[int] | torch.Tensor]:
        """Per sequence, the model's argmax tokens (greedy) or its sampling distributions on the CPU
        ([m + 1, vocab]); one device sync for all of them. ``torch.cat`` copies the logits out of the
        verify graph's output buffer before anything else runs."""
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
    if not isinstance(backend, (PagedBackend, TensorParallelBackend)):
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
                        runtime={"cuda_graphs": cfg.runtime.cuda_graphs,
                                 "fused_attention": cfg.runtime.fused_attention})
    log.info("speculative decoding with the draft model %s (%d tokens per step)", source, cfg.speculative.num_tokens)
    return PagedBackend(cast(LlamaCausalLM, draft), draft_cfg, context_window)  # unsupported() checked its shape
