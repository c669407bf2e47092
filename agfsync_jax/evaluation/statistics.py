"""Means with confidence intervals, per-category win rates, TIFA accuracy per element type.

All functions are pure numpy and deterministic (the bootstrap takes an explicit seed).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from agfsync_jax.schemas import VqaAnswer


def mean_ci(values: Sequence[float], seed: int = 0, level: float = 0.95,
            resamples: int = 2000) -> dict[str, float]:
    """Mean and a percentile-bootstrap confidence interval.

    The bootstrap rather than mean +- 1.96 se because scores like VQA accuracy are bounded and
    skewed on small prompt sets, where the normal interval spills outside [0, 100].
    """
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(x.size)}


def win_rate(finetuned: Sequence[float], base: Sequence[float]) -> float:
    """Fraction of prompts where finetuned beats base; a tie counts one half."""
    f, b = np.asarray(finetuned, np.float64), np.asarray(base, np.float64)
    if f.shape != b.shape or f.size == 0:
        raise ValueError(f"win_rate needs two equal, non-empty arrays, got {f.shape} and {b.shape}")
    return float(np.mean((f > b) + 0.5 * (f == b)))


def sign_test(finetuned: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """Wins, losses and ties of finetuned over base, and the one-sided exact sign-test p-value.

    p = P(X >= wins) for X ~ Binomial(wins + losses, 1/2): how often a coin flip per prompt does
    at least as well, so a win rate on a small prompt set can be read as evidence or not. Ties
    carry no direction and are dropped (the usual sign test); with no untied prompt p is 1.
    """
    f, b = np.asarray(finetuned, np.float64), np.asarray(base, np.float64)
    if f.shape != b.shape or f.size == 0:
        raise ValueError(f"sign_test needs two equal, non-empty arrays, got {f.shape} and {b.shape}")
    wins, losses = int(np.sum(f > b)), int(np.sum(f < b))
    n = wins + losses
    p = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2.0**n
    return {"wins": wins, "losses": losses, "ties": int(f.size - n), "p_one_sided": float(p)}


def win_rates_by_category(categories: Sequence[str], finetuned: Mapping[str, Sequence[float]],
                          base: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """{category: {score: win rate}} plus an "all" row (the paper's Table 1 layout)."""
    cats = np.asarray(categories)
    table: dict[str, dict[str, float]] = {}
    for cat in sorted(set(categories)) + ["all"]:
        mask = np.ones(len(cats), bool) if cat == "all" else cats == cat
        table[cat] = {name: win_rate(np.asarray(finetuned[name])[mask], np.asarray(base[name])[mask])
                      for name in finetuned}
    return table


def accuracy_by_element_type(answers: Iterable[VqaAnswer]) -> dict[str, dict[str, Any]]:
    """TIFA-style accuracy per element type, plus an "all" row over every question.

    Per type: `questions` (count), `accuracy` (fraction answered correctly: TIFA's metric; in
    likelihood mode the answer is yes when P(yes) > 0.5) and `mean_credit` (mean share of the VQA
    score: P(expected answer) in likelihood mode, equal to `accuracy` in generate mode).
    """
    correct: dict[str, list[float]] = defaultdict(list)
    credit: dict[str, list[float]] = defaultdict(list)
    for a in answers:
        for key in (a.element_type, "all"):
            correct[key].append(1.0 if a.correct else 0.0)
            credit[key].append(a.credit)
    order = sorted(t for t in correct if t != "all") + (["all"] if correct else [])
    return {t: {"questions": len(correct[t]), "accuracy": float(np.mean(correct[t])),
                "mean_credit": float(np.mean(credit[t]))} for t in order}
