"""The one family rule of classify and search: lineage evidence first, statistics after, agreement reported."""

from __future__ import annotations

from tg_verify.analysis.family import Derivation, decide_family, strongest


def test_a_derivation_decides_over_the_statistics_and_agreement_is_reported():
    derived = [Derivation("qwen-base", "qwen", 0.62), Derivation("llama-base", "llama", 0.91)]
    decision = decide_family(derived, "qwen", "qwen-base")
    assert decision == {"family": "llama", "base": "llama-base", "by": "lineage", "statistics_family": "qwen",
                        "agrees": False}
    assert decide_family(derived, "llama", "llama-base")["agrees"] is True
    assert decide_family(derived, None, None)["agrees"] is None


def test_without_a_derivation_the_meaningful_statistics_answer_else_nobody():
    assert decide_family([], "gemma", "gemma-base") == {"family": "gemma", "base": "gemma-base", "by": "statistics",
                                                        "statistics_family": "gemma", "agrees": None}
    assert decide_family([], None, "gemma-base") == {"family": None, "base": None, "by": None,
                                                     "statistics_family": None, "agrees": None}


def test_the_strongest_derivation_wins_ties_go_to_the_first_given_and_nan_never_wins():
    a, b, c = Derivation("a", "x", 0.8), Derivation("b", "y", 0.8), Derivation("c", "z", float("nan"))
    assert strongest([c, a, b]) == a
    assert strongest([b, a]) == b
    assert strongest([c]) == c
    assert strongest([]) is None
