"""Preference tuning's arithmetic and parts, without a training run: the DPO and ORPO losses against
values computed by hand, the chunked answer log-probabilities against log_softmax (values and
gradients), the reference taken from the disabled adapter with no copy of the weights, the answer-only
mask of an encoded pair, and the config's refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import METHODS_MODEL as MODEL

from lmforge.config.training import TrainingConfig
from lmforge.data.packing import IGNORE_INDEX
from lmforge.model.build import build_model
from lmforge.tokenizer.build import load_tokenizer
from lmforge.train.methods.catalog import apply_method
from lmforge.train.objective import TokenLogProbs, sequence_logps, token_logps, token_logps_grad
from lmforge.train.preference import PreferenceObjective, dpo_loss, orpo_loss
from lmforge.train.preference_data import encode_preferences, reference_logps


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _log_softmax_at(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(v) for v in row))


# Two pairs of one-token answers over a vocabulary of 3; the output layer is the identity, so the
# hidden states are the logits.
LOGITS = [[[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], [[1.0, 1.0, 1.0], [-2.0, 3.0, 0.5]]]
TARGETS = [[0, 2], [1, 1]]  # (pair, side): the answer token
REFERENCE = [[-1.2, -0.9], [-1.0, -1.3]]


def _policy_logps() -> torch.Tensor:
    hidden = torch.tensor(LOGITS).flatten(0, 1)
    targets = torch.tensor(TARGETS).flatten()
    return TokenLogProbs.apply(hidden, torch.eye(3), targets, token_logps, token_logps_grad).view(2, 2)


def test_dpo_loss_and_rewards_equal_the_hand_computed_values():
    beta = 0.1
    policy = _policy_logps()
    hand = [[_log_softmax_at(LOGITS[p][s], TARGETS[p][s]) for s in range(2)] for p in range(2)]
    torch.testing.assert_close(policy, torch.tensor(hand))
    losses, chosen, rejected = dpo_loss(policy, torch.tensor(REFERENCE), beta)
    for p in range(2):
        logit = beta * ((hand[p][0] - REFERENCE[p][0]) - (hand[p][1] - REFERENCE[p][1]))
        assert losses[p].item() == pytest.approx(-math.log(_sigmoid(logit)), rel=1e-6)
        assert chosen[p].item() == pytest.approx(beta * (hand[p][0] - REFERENCE[p][0]), rel=1e-6)
        assert rejected[p].item() == pytest.approx(beta * (hand[p][1] - REFERENCE[p][1]), rel=1e-6)


def test_orpo_loss_and_rewards_equal_the_hand_computed_values():
    beta, counts = 0.25, torch.tensor([[1.0, 1.0], [2.0, 1.0]])  # pair 1's chosen answer: two tokens (mean logp)
    policy = _policy_logps()
    losses, chosen, rejected = orpo_loss(policy, counts, beta)
    for p in range(2):
        a_c, a_r = (policy[p, s].item() / counts[p, s].item() for s in range(2))
        odds = (a_c - math.log(1 - math.exp(a_c))) - (a_r - math.log(1 - math.exp(a_r)))
        assert losses[p].item() == pytest.approx(-a_c - beta * math.log(_sigmoid(odds)), rel=1e-5)
        assert (chosen[p].item(), rejected[p].item()) == pytest.approx((beta * a_c, beta * a_r), rel=1e-6)


def test_chunked_answer_logps_match_log_softmax_in_value_and_gradient(monkeypatch):
    import lmforge.train.objective as objective

    monkeypatch.setattr(objective, "LOGPROB_CHUNK_BYTES", 4 * 50 * 128)  # 128-row chunks: 300 rows take three
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (300,), generator=gen)
    targets[::7] = IGNORE_INDEX
    upstream = torch.randn(300, generator=gen)
    ours = TokenLogProbs.apply(hidden, weight, targets, token_logps, token_logps_grad)
    (ours * upstream).sum().backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    picked = (hidden @ weight.T).log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    plain = torch.where(targets != IGNORE_INDEX, picked, 0.0)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(ours_grads, (hidden.grad, weight.grad))


@pytest.fixture(scope="module")
def tokenizer(tokenized_workspace):
    return load_tokenizer(tokenized_workspace("preference-parts", MODEL).tokenizer_dir)


PAIRS = [
    {"id": "a", "prompt": [{"role": "user", "content": "What does len do?"}],
     "chosen": [{"role": "assistant", "content": "Return the number of items."}],
     "rejected": [{"role": "assistant", "content": "Sort a list."}]},
    {"id": "b", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "abs?"},
                           {"role": "assistant", "content": "A builtin."}, {"role": "user", "content": "Which value?"}],
     "chosen": [{"role": "assistant", "content": "The absolute value."}],
     "rejected": [{"role": "assistant", "content": "The square root."}]},
]


def test_a_pair_is_encoded_with_the_chat_template_and_only_its_answer_is_scored(tokenizer):
    rows = encode_preferences(PAIRS, tokenizer, seq_len=128)
    assert rows["input_ids"].shape == (2, 2, 128)
    for p, record in enumerate(PAIRS):
        for s, side in enumerate(("chosen", "rejected")):
            labels = rows["labels"][p, s]
            learned = tokenizer.decode(labels[labels != IGNORE_INDEX])
            assert learned.startswith(record[side][0]["content"])  # the answer (and its end-of-turn token), ...
            assert "A builtin." not in learned  # ... never an earlier answer inside the prompt
        # Both answers follow the same prompt tokens.
        first = int((rows["labels"][p, 0] != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(rows["input_ids"][p, 0, :first], rows["input_ids"][p, 1, :first])


def test_the_reference_is_the_base_with_the_adapter_disabled_and_no_copy_of_its_weights(tokenizer):
    torch.manual_seed(0)
    base = build_model(MODEL, len(tokenizer))
    untouched = copy.deepcopy(base)  # the test's own copy, to score the base independently
    model = apply_method(base, TrainingConfig(method="lora"))
    with torch.no_grad():  # a trained adapter: LoRA's B is no longer zero, so the adapter changes every answer
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    rows = encode_preferences(PAIRS, tokenizer, seq_len=128)
    ids, labels = rows["input_ids"].flatten(0, 1), rows["labels"].flatten(0, 1)

    reference = reference_logps(model, rows, batch_size=1, device=torch.device("cpu"))
    with torch.no_grad():
        base_scores, _ = sequence_logps(untouched.eval(), ids, labels)
        adapted_scores, _ = sequence_logps(model.eval(), ids, labels)
    torch.testing.assert_close(reference.flatten(), base_scores)
    assert not torch.allclose(adapted_scores, base_scores, atol=1e-3)  # the adapter was really switched off

    # What trains (and what DDP would wrap) holds the model's own parameters and nothing else: no
    # second copy of the weights stands in as the reference.
    objective = PreferenceObjective(model, "dpo", beta=0.1)
    storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert {p.untyped_storage().data_ptr() for p in objective.parameters()} == storage
    assert sum(p.numel() for p in objective.parameters()) == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in objective.parameters() if not p.requires_grad) == \
        sum(p.numel() for p in untouched.parameters())  # the frozen base, once


@pytest.mark.parametrize(("training", "message"), [
    ({"method": "dpo", "preference": {"loss": "orpo"}}, "method: dpo asks for dpo, but preference.loss is 'orpo'"),
    ({"method": "pretrain", "preference": {"loss": "dpo"}}, "method pretrain has none"),
    ({"method": "dpo", "speed": {"compile": True, "compile_scope": "model"}}, "speed.compile_scope: blocks"),
    ({"method": "orpo", "loss": {"label_smoothing": 0.1}}, "loss.label_smoothing and loss.kernel"),
    ({"method": "dpo", "preference": {"beta": 0}}, "greater than 0"),
    ({"method": "dpo", "preference": {"reference": "copy"}}, "Extra inputs are not permitted"),
])
def test_bad_preference_config_is_refused_with_the_fix(training, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(").replace("'", "'")):
        TrainingConfig.model_validate(training)


def test_method_dpo_is_lora_with_the_dpo_loss_and_round_trips():
    training = TrainingConfig.model_validate({"method": "dpo", "preference": {"beta": 0.3}})
    assert (training.method, training.preference.loss, training.preference.beta) == ("lora", "dpo", 0.3)
    assert TrainingConfig.model_validate(training.model_dump(mode="json")) == training
    full = TrainingConfig.model_validate({"method": "full", "preference": {"loss": "orpo"}})
    assert full.method == "full" and full.preference_tuning
