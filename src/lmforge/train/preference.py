"""Preference tuning's objective: DPO and ORPO losses over (chosen, rejected) pairs, and their rewards.

:class:`PreferenceObjective` is the module the loop trains through when ``training.preference.loss``
is set (:func:`lmforge.train.loop.train_phase`). A batch holds pairs: ``input_ids`` and ``labels``
of shape (pairs, 2, seq_len), the chosen answer first, labels on the answer's tokens only
(:mod:`lmforge.train.preference_data`). Chosen and rejected go through the model as one batch of
2 x pairs rows, as TRL's concatenated forward does, and each row's answer log-probability is summed
through the output layer in chunks (:func:`lmforge.train.objective.sequence_logps`).

DPO (Rafailov et al. 2023) compares those log-probabilities with the reference's, the frozen base
scored once before the first step (``reference_logps`` in the batch, see
:func:`lmforge.train.preference_data.attach_reference`). ORPO (Hong et al. 2024) needs no
reference: the chosen answer's NLL plus ``beta`` times an odds-ratio term, each per token. ORPO was
chosen over SimPO as the reference-free variant because our fine-tuning phase may start from a base
that had no SFT phase, which ORPO's NLL term is designed for (SimPO assumes an SFT'd start and is
sensitive to its margin and learning rate).

Rewards are what TRL logs: DPO's ``beta * (policy - reference)`` answer log-ratio, ORPO's ``beta``
times the mean per-token log-probability; the margin is chosen minus rejected, the accuracy the share
of pairs whose chosen reward is the higher.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmforge.core.errors import DataError
from lmforge.train.objective import sequence_logps, token_logps, token_logps_grad

if TYPE_CHECKING:
    from lmforge.model.types import CausalLM

METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


class PreferenceObjective(torch.nn.Module):
    """``forward(input_ids, labels, attention_mask=None, reference_logps=None)`` -> the pairs' summed
    loss, then their summed :data:`METRICS` (one vector; the loop divides it by the pairs)."""

    metric_names = METRICS

    def __init__(self, model: CausalLM, loss: str, beta: float, compile_chunks: bool = False) -> None:
        super().__init__()
        self.model, self.loss, self.beta = model, loss, beta
        fns = (token_logps, token_logps_grad)
        self.chunk_fns = tuple(torch.compile(f, dynamic=False) for f in fns) if compile_chunks else fns

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                reference_logps: torch.Tensor | None = None) -> torch.Tensor:
        pairs = input_ids.shape[0]
        mask = attention_mask.flatten(0, 1) if attention_mask is not None else None
        logps, counts = sequence_logps(self.model, input_ids.flatten(0, 1), labels.flatten(0, 1), mask, self.chunk_fns)
        logps, counts = logps.view(pairs, 2), counts.view(pairs, 2)
        if self.loss == "dpo":
            if reference_logps is None:
                raise DataError("a DPO batch came without reference log-probabilities",
                                "report this as a bug (attach_reference runs before a DPO phase)")
            losses, chosen, rejected = dpo_loss(logps, reference_logps, self.beta)
        else:
            losses, chosen, rejected = orpo_loss(logps, counts, self.beta)
        return torch.stack([losses.sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                            (chosen > rejected).float().sum()])

    @staticmethod
    def units(micro: list[dict[str, torch.Tensor]]) -> int:
        """Pairs in these micro-batches: the loss and rewards are means per pair."""
        return sum(len(b["input_ids"]) for b in micro)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) of DPO's sigmoid loss.

    ``policy`` and ``reference`` are summed answer log-probabilities, shape (pairs, 2), chosen first:
    loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))); rewards beta * (pi - ref), detached.
    """
    ratios = policy - reference.to(policy.dtype)
    losses = -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))
    rewards = beta * ratios.detach()
    return losses, rewards[:, 0], rewards[:, 1]


def orpo_loss(policy: torch.Tensor, counts: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) of ORPO.

    With mean per-token log-probabilities a = logp / tokens: loss = -a_c - beta * log sigmoid(log odds_c -
    log odds_r), log odds = a - log(1 - exp(a)); rewards beta * a, detached (TRL's ORPO logs the same).
    """
    mean = policy / counts.clamp(min=1)
    # log(1 - exp(a)) as log(-expm1(a)): exact near a = 0 (a certain answer), where 1 - exp(a) underflows.
    log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-6)))
    losses = -mean[:, 0] - beta * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
    rewards = beta * mean.detach()
    return losses, rewards[:, 0], rewards[:, 1]


@contextmanager
def reference_model(model: CausalLM) -> Iterator[CausalLM]:
    """``model`` as the reference: its peft adapter disabled (the frozen base, the same weights, no copy).

    Other models are their own reference at the start of the phase: full fine-tuning has not moved
    yet, and bottleneck adapters start as the identity.
    """
    disable = getattr(model, "disable_adapter", None) if hasattr(model, "peft_config") else None
    with disable() if disable is not None else nullcontext():
        yield model
