"""Eval prompt sets: stratified draws that keep every category, and no prompt training saw."""

from __future__ import annotations

import collections

from agfsync_jax.evaluation import prompt_selection
from agfsync_jax.schemas import PromptRecord


def _records(counts: dict[str, int]) -> list[PromptRecord]:
    return [PromptRecord(id=f"{c[:3]}{i:03d}", category=c, prompt=f"{c} prompt {i}", source="test")
            for c, n in counts.items() for i in range(n)]


def test_allocation_is_proportional_and_sums_to_the_request():
    counts = {"a": 200, "b": 100, "c": 7}
    # Quotas 19.54, 9.77, 0.68: floors 19, 9, 0, then the two largest remainders (c, b) get one more.
    assert prompt_selection.allocate(counts, 30) == {"a": 19, "b": 10, "c": 1}
    assert prompt_selection.allocate(counts, 1000) == counts


def test_stratified_sample_covers_every_category_and_is_seeded():
    records = _records({"Colors": 25, "Counting": 19, "Text": 21, "Positional": 20, "Rare Words": 7})
    chosen, info = prompt_selection.stratified_sample(records, 20, seed=3)
    by_cat = collections.Counter(r.category for r in chosen)
    assert len(chosen) == 20 and set(by_cat) == {r.category for r in records}
    assert info["selected"] == 20 and info["available"] == 92
    assert info["by_category"]["Rare Words"] == [by_cat["Rare Words"], 7]
    again, _ = prompt_selection.stratified_sample(records, 20, seed=3)
    other, _ = prompt_selection.stratified_sample(records, 20, seed=4)
    assert [r.id for r in again] == [r.id for r in chosen] and [r.id for r in other] != [r.id for r in chosen]
    # Not the first rows of each category: a file's order does not decide what is evaluated.
    first = {c: sorted(r.id for r in records if r.category == c)[:by_cat[c]] for c in by_cat}
    assert any(sorted(r.id for r in chosen if r.category == c) != first[c] for c in by_cat)


def test_prompts_training_saw_are_dropped_ignoring_case_and_spaces():
    records = _records({"animals": 3})
    kept, dropped = prompt_selection.drop_seen(records, ["ANIMALS  prompt 1"])
    assert dropped == 1 and [r.prompt for r in kept] == ["animals prompt 0", "animals prompt 2"]
