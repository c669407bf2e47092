"""Means with confidence intervals, per-category win rates, TIFA accuracy per element type.

All functions are pure numpy and deterministic (the bootstrap takes an explicit seed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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


def accuracy_by_element_type(element_types: Sequence[Sequence[str]],
                             answers: Sequence[Sequence[float]]) -> dict[str, dict[str, Any]]:
    """TIFA-style accuracy per element type: mean per-question VQA result, and the count."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for types, vals in zip(element_types, answers):
        if len(types) != len(vals):
            raise ValueError(f"{len(types)} questions but {len(vals)} VQA answers")
        for t, v in zip(types, vals):
            sums[t] += float(v)
            counts[t] += 1
    return {t: {"accuracy": sums[t] / counts[t], "questions": counts[t]} for t in sorted(counts)}
