"""Hand-computed checks of the evaluation statistics."""

import numpy as np
import pytest

from agfsync_jax.evaluation import statistics


def test_win_rate_counts_ties_as_half():
    assert statistics.win_rate([3, 2, 1, 5], [1, 2, 4, 5]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    with pytest.raises(ValueError):
        statistics.win_rate([1, 2], [1])


def test_win_rates_by_category_has_all_row():
    table = statistics.win_rates_by_category(
        ["a", "a", "b"], {"clip": [2, 0, 1]}, {"clip": [1, 1, 1]})
    assert table == {"a": {"clip": 0.5}, "b": {"clip": 0.5}, "all": {"clip": pytest.approx(0.5)}}


def test_mean_ci_brackets_mean_and_is_deterministic():
    x = np.random.default_rng(0).normal(50, 10, size=200)
    a, b = statistics.mean_ci(x, seed=3), statistics.mean_ci(x, seed=3)
    assert a == b
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    # For n=200 the bootstrap interval is close to the normal one (half-width 1.96 * se).
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert (a["ci_high"] - a["ci_low"]) / 2 == pytest.approx(1.96 * se, rel=0.15)


def _answer(element_type: str, correct: bool, credit: float):
    from agfsync_jax.schemas import VqaAnswer

    return VqaAnswer(question="q?", element_type=element_type, expected="yes", answer="yes" if correct else "no",
                     is_yes=correct, p_yes=credit, correct=correct, credit=credit)


def test_accuracy_by_element_type():
    answers = [_answer("color", True, 0.9), _answer("object", False, 0.2), _answer("color", False, 0.4),
               _answer("color", True, 0.6)]
    acc = statistics.accuracy_by_element_type(answers)
    assert list(acc) == ["color", "object", "all"]
    assert acc["color"] == {"questions": 3, "accuracy": pytest.approx(2 / 3), "mean_credit": pytest.approx(1.9 / 3)}
    assert acc["object"] == {"questions": 1, "accuracy": 0.0, "mean_credit": pytest.approx(0.2)}
    assert acc["all"] == {"questions": 4, "accuracy": 0.5, "mean_credit": pytest.approx(2.1 / 4)}
    assert statistics.accuracy_by_element_type([]) == {}


def test_sign_test_matches_scipy_binomtest_and_drops_ties():
    from scipy.stats import binomtest

    fine = [3.0] * 15 + [1.0] * 7 + [2.0] * 2
    base = [2.0] * 24
    t = statistics.sign_test(fine, base)
    assert (t["wins"], t["losses"], t["ties"]) == (15, 7, 2)
    assert t["p_one_sided"] == pytest.approx(binomtest(15, 22, 0.5, alternative="greater").pvalue, rel=1e-12)
    # 17 of 24 untied wins is the smallest count with p < 0.05.
    assert statistics.sign_test([1.0] * 17 + [0.0] * 7, [0.5] * 24)["p_one_sided"] < 0.05
    assert statistics.sign_test([1.0] * 16 + [0.0] * 8, [0.5] * 24)["p_one_sided"] > 0.05
    assert statistics.sign_test([1.0, 2.0], [1.0, 2.0]) == {"wins": 0, "losses": 0, "ties": 2, "p_one_sided": 1.0}
    with pytest.raises(ValueError):
        statistics.sign_test([1.0], [1.0, 2.0])
