"""Metric arithmetic: known values for perplexity, exact match, ROUGE-L and relative improvement."""

from __future__ import annotations

import math

import pytest

from lmforge.evaluation import metrics as M


def test_perplexity_is_exp_of_mean_loss():
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(math.log(317.0)) == pytest.approx(317.0)
    assert M.perplexity(1000.0) == math.inf
    assert math.isnan(M.perplexity(math.nan))


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Return the absolute value.", "return absolute value", 1.0),
        ("  The   answer!  ", "answer", 1.0),
        ("An apple", "a apple", 1.0),
        ("Return the value", "Return a number", 0.0),
        ("", "", 1.0),
        ("", "something", 0.0),
    ],
)
def test_exact_match_normalizes_case_punctuation_articles_space(prediction, reference, expected):
    assert M.exact_match(prediction, reference) == expected


def test_lcs_length_known_values():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert M.lcs_length([], ["a"]) == 0
    assert M.lcs_length(["a", "b"], ["a", "b"]) == 2


def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/6, R = 5/5.
    assert M.rouge_l_f1("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * (5 / 6) * 1 / (5 / 6 + 1))
    # LCS("police killed the gunman", "the gunman killed police") = 2 ("the gunman" or "killed police").
    assert M.rouge_l_f1("police killed the gunman", "the gunman killed police") == pytest.approx(0.5)
    assert M.rouge_l_f1("Return JSON.", "return json") == 1.0
    assert M.rouge_l_f1("alpha beta", "gamma delta") == 0.0
    assert M.rouge_l_f1("", "") == 1.0
    assert M.rouge_l_f1("", "x") == 0.0


def test_mean_of_nothing_is_nan():
    assert M.mean([1.0, 0.0]) == 0.5
    assert math.isnan(M.mean([]))


def test_relative_improvement_in_both_directions():
    assert M.relative_improvement(9.0, 10.0, "min") == pytest.approx(0.1)
    assert M.relative_improvement(11.0, 10.0, "min") == pytest.approx(-0.1)
    assert M.relative_improvement(0.6, 0.5, "max") == pytest.approx(0.2)
    assert M.relative_improvement(1.0, 0.0, "max") == math.inf
    assert M.relative_improvement(0.0, 0.0, "max") == 0.0
    assert math.isnan(M.relative_improvement(math.nan, 1.0, "min"))
