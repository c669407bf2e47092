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


def test_accuracy_by_element_type():
    acc = statistics.accuracy_by_element_type([("color", "object"), ("color",)], [(1.0, 0.0), (0.0,)])
    assert acc == {"color": {"accuracy": 0.5, "questions": 2}, "object": {"accuracy": 0.0, "questions": 1}}
    with pytest.raises(ValueError):
        statistics.accuracy_by_element_type([("color",)], [(1.0, 0.0)])
