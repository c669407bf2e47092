"""Which prompts an evaluation uses: N of a prompt set's M, stratified by category, with a seed.

Taking the first N rows of a benchmark file evaluates whatever the file happens to list first
(a few of DrawBench's categories, one-word PartiPrompts); a stratified draw keeps every category
in proportion, and the report says how many of how many were used.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence

import numpy as np

from agfsync_jax.schemas import KIND_PROMPT, PromptRecord


def drop_seen(records: Sequence[PromptRecord], seen_prompts: Iterable[str]) -> tuple[list[PromptRecord], int]:
    """Records whose prompt text (case- and space-insensitive) is not in `seen_prompts`; and the count dropped."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    seen = {norm(p) for p in seen_prompts}
    kept = [r for r in records if norm(r.prompt) not in seen]
    return kept, len(records) - len(kept)


def allocate(counts: dict[str, int], total: int) -> dict[str, int]:
    """Per-category sample sizes summing to min(total, sum(counts)), proportional to `counts`
    (largest remainder; ties broken by category name)."""
    available = sum(counts.values())
    if total >= available:
        return dict(counts)
    quotas = {c: total * n / available for c, n in counts.items()}
    out = {c: min(counts[c], math.floor(q)) for c, q in quotas.items()}
    by_remainder = sorted(counts, key=lambda c: (-(quotas[c] - math.floor(quotas[c])), c))
    while sum(out.values()) < total:
        for c in by_remainder:
            if sum(out.values()) == total:
                break
            if out[c] < counts[c]:
                out[c] += 1
    return out


def stratified_sample(records: Sequence[PromptRecord], num: int, seed: int) -> tuple[list[PromptRecord], dict]:
    """`num` plain prompts drawn per category in proportion to the set; returns them (sorted by id)
    and {"selected": N, "available": M, "by_category": {cat: [n, m]}}."""
    plain = [r for r in records if r.kind == KIND_PROMPT]
    groups: dict[str, list[PromptRecord]] = collections.defaultdict(list)
    for r in sorted(plain, key=lambda r: r.id):
        groups[r.category].append(r)
    sizes = allocate({c: len(g) for c, g in groups.items()}, int(num))
    rng = np.random.default_rng(seed)
    chosen: list[PromptRecord] = []
    for cat in sorted(groups):
        order = rng.permutation(len(groups[cat]))[: sizes[cat]]
        chosen += [groups[cat][i] for i in sorted(order)]
    chosen.sort(key=lambda r: r.id)
    info = {"selected": len(chosen), "available": len(plain),
            "by_category": {c: [sizes[c], len(groups[c])] for c in sorted(groups)}}
    return chosen, info
