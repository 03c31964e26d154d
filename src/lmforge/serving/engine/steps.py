"""One engine step: a prefill round, then a decode round, each schedule -> execute -> update.

The scheduler (``engine/scheduler.py``) says which sequences run; :class:`Steps` runs them on the
backend, chooses the next tokens (``engine/sampling.py``) and hands them back to the scheduler,
which sends the text and finishes the done sequences.

Overlap (backends with ``overlap``, ``serving.runtime.overlap_decode``): the next decode step is
launched from the tokens a step has just chosen *on the device*, before they reach the host, so the
GPU never waits for Python. Per step the device runs: mask and pick step t's tokens, then forward
t+1; meanwhile the host receives step t's tokens (``model/transfer.py: HostCopy``: it waits for them
alone, not for forward t+1), advances the grammars and fills step t+1's masks, and turns the tokens
into text. A sequence that turns out to have finished at step t (EOS, a stop string, a grammar's
end) wastes its row of forward t+1; that row is dropped, and its cache write landed in blocks the
sequence reserved for itself (generated positions are never shared through the prefix cache).
With speculative decoding, the next step is launched ahead only when every sequence's next round is
certainly plain (``Speculator.plain_next``: paused, or never speculated): one that may guess must
wait for its token, which its proposer reads, and the plain ones then ride along in its verify
forward (one forward for the round, not a launched decode step and a verify).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmforge.serving.backends.base import Backend, PrefillItem
from lmforge.serving.engine.sampling import TokenLogprob, pick_tokens, token_logprobs
from lmforge.serving.engine.scheduler import Scheduler
from lmforge.serving.engine.sequence import Sequence, prompt_logprobs
from lmforge.serving.engine.structured import accept_tokens, mask_logits
from lmforge.serving.model.transfer import HostCopy, to_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmforge.serving.engine.speculative import Speculator


class Steps:
    """Runs the engine's steps; owned by the engine thread. ``stats`` counts forward passes and the
    most rows decoded together (for benchmarks and tests)."""

    def __init__(self, scheduler: Scheduler, backend: Backend, tokenizer: PreTrainedTokenizerBase,
                 speculator: Speculator | None, overlap: bool, stats: dict[str, int]) -> None:
        self.scheduler = scheduler
        self.backend = backend
        self.tokenizer = tokenizer
        self.speculator = speculator
        self.overlap = overlap and backend.overlap
        self.stats = stats
        # The decode step launched ahead: its sequences and (the device buffer of) their logits.
        self._ahead: tuple[list[Sequence], torch.Tensor] | None = None

    def step(self) -> None:
        chunks = self.scheduler.schedule_prefill()
        if chunks:
            self._prefill(chunks)
        seqs = self.scheduler.schedule_decode()
        if seqs:
            self._decode(seqs)

    def reset(self) -> None:
        """Forget the step launched ahead (after a failed step: its sequences were failed)."""
        self._ahead = None

    def _prefill(self, chunks: list[tuple[Sequence, PrefillItem]]) -> None:
        logits = self.backend.prefill([item for _, item in chunks])
        self.stats["prefills"] += 1
        self.stats["merges"] += bool(self.scheduler.running)
        last: dict[int, torch.Tensor] = {}
        for (seq, item), rows in zip(chunks, logits):
            if item.all_logits:
                prompt_logprobs(seq, item.start, rows, self.tokenizer)
            last[id(seq)] = rows[-1:]
        whole = self.scheduler.prefilled(chunks)
        if whole:
            self._advance(whole, torch.cat([last[id(seq)] for seq in whole]))

    def _decode(self, running: list[Sequence]) -> None:
        # The step launched ahead first: its logits are copied out of the decode graphs' output buffer
        # whenever another forward follows, here or in the speculator.
        seqs, logits = self._take_ahead(running)
        have = {id(s) for s in seqs}
        if self.speculator is not None:  # its sequences take their own step; the rest decode below
            running = self.speculator.run(running, self.scheduler, seqs)
        rest = [s for s in running if id(s) not in have]  # joined since, or not launched ahead
        if rest:  # (_take_ahead copied the step's logits: this launch may reuse the graphs' output buffer)
            fresh = self.backend.decode([s.row for s in rest], [s.position for s in rest], [s.next_token for s in rest])
            logits = fresh if logits is None else torch.cat([logits, fresh])
            seqs = seqs + rest
        if logits is None:  # the speculator stepped every sequence
            return
        self.stats["decode_steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(seqs))
        self._advance(seqs, logits, ahead=self.overlap)
        if self.speculator is not None:
            self.speculator.release_finished(self.scheduler.running)

    def _take_ahead(self, running: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None]:
        """The still-running sequences of the step launched ahead, and their logits: the launch's own
        buffer when they are the whole batch, else a copy (queued without waiting), because another
        launch follows (the graphs share one output pool) or rows were dropped."""
        if self._ahead is None:
            return [], None
        seqs, logits = self._ahead
        self._ahead = None
        live = {id(s) for s in running}
        keep = [i for i, s in enumerate(seqs) if id(s) in live]
        if len(keep) == len(seqs):
            return seqs, logits.clone() if len(running) > len(seqs) else logits
        if not keep:
            return [], None
        return [seqs[i] for i in keep], logits.index_select(0, to_device(keep, torch.long, logits.device))

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor, ahead: bool = False) -> None:
        """Choose each sequence's next token and hand the tokens to the scheduler (which sends the
        text, finishes the done sequences and keeps the others running). With ``ahead``, the next
        decode step is launched from the device's tokens first (see the module docstring)."""
        grammars, raw = [s.grammar for s in seqs], logits
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if any(grammars):  # logprobs report the model's own distribution, as without a grammar
            raw = logits.clone() if wanted else logits
            mask_logits(logits, grammars)
        picked = pick_tokens(logits, [s.params for s in seqs], [s.rng for s in seqs])
        if ahead and not wanted:  # logprobs read these logits below: no launch may reuse their buffer first
            copy = HostCopy(picked)
            self._launch_ahead(seqs, picked)
            tokens: list[int] = copy.wait()
        else:
            tokens = picked.tolist()
        entries: dict[int, TokenLogprob] = {}
        if wanted:
            found = token_logprobs(raw[wanted], [tokens[i] for i in wanted],
                                   [seqs[i].params.logprobs or 0 for i in wanted], self.tokenizer)
            entries = dict(zip(wanted, found))
        accept_tokens(grammars, tokens)  # next masks: on the CPU while the step launched above runs
        self.scheduler.update(seqs, tokens, entries)

    def _launch_ahead(self, seqs: list[Sequence], picked: torch.Tensor) -> None:
        """Launch the decode step after this one for every sequence that may go on, fed ``picked``."""
        go_on = [i for i, s in enumerate(seqs) if self._may_continue(s)]
        if not go_on or (self.speculator is not None and not self._all_plain_next()):
            return
        if len(go_on) < len(seqs):
            picked = picked.index_select(0, to_device(go_on, torch.long, picked.device))
        nxt = [seqs[i] for i in go_on]
        self.stats["launched_ahead"] += 1
        # Positions: the chosen token is not yet in token_ids, and is fed right after them.
        logits = self.backend.decode([s.row for s in nxt], [len(s.prompt) + len(s.token_ids) for s in nxt], picked)
        self._ahead = (nxt, logits)

    def _all_plain_next(self) -> bool:
        """Whether no sequence of the batch may guess in the next round: the ones stepped here, those the
        speculator verified this round, and those about to join from their prefill."""
        assert self.speculator is not None
        scheduler = self.scheduler
        return all(self.speculator.plain_next(s) for group in (scheduler.running, scheduler.prefilling) for s in group)

    def _may_continue(self, seq: Sequence) -> bool:
        """Whether ``seq`` may need a step after this one (its token is not known yet: EOS and stop
        strings are decided when it is), with cache room for it."""
        if seq.request.cancelled.is_set() or len(seq.token_ids) + 1 >= seq.params.max_tokens:
            return False
        backend = self.backend
        return backend.reserves_worst_case or backend.grow(seq.row, len(seq.prompt) + len(seq.token_ids) + 1)
