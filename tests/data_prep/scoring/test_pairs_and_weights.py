"""Weighted totals and the winner/loser choice on hand-computed examples."""

from __future__ import annotations

import pytest

from agfsync_jax.schemas import PAIR_AGFSYNC, PAIR_CROSS, PromptRecord, ScoreRow
from data_prep.scoring.pairs import BELOW_MARGIN, MISSING_INSTRUCTION, TIE, TOO_FEW, select_pairs
from agfsync_jax.score_weights import parse_weights, resolve_weights, weighted_total


def _row(pid: str, cand: int, scores: dict[str, float], weights: dict[str, float], instruction: int = 0) -> ScoreRow:
    return ScoreRow(prompt_id=pid, candidate=cand, scores=scores, total=weighted_total(scores, weights),
                    scorers={k: "test" for k in scores}, instruction=instruction)


def _record(pid: str, **kw) -> PromptRecord:
    return PromptRecord(id=pid, category="animals", prompt=f"prompt {pid}", source="test", **kw)


def test_paper_weights_hand_computed():
    w = resolve_weights("paper")
    assert w == {"vqa": 0.35, "clip": 0.55, "aesthetic": 0.10}
    # 0.35 * 80 + 0.55 * 30 + 0.10 * 60 = 28 + 16.5 + 6 = 50.5
    assert weighted_total({"vqa": 80.0, "clip": 30.0, "aesthetic": 60.0}, w) == pytest.approx(50.5)


def test_released_code_preset_ignores_vqa():
    w = resolve_weights("released_code")
    assert w == {"clip": 0.85, "aesthetic": 0.15}
    # 0.85 * 30 + 0.15 * 60 = 25.5 + 9 = 34.5, whatever the VQA score
    assert weighted_total({"vqa": 0.0, "clip": 30.0, "aesthetic": 60.0}, w) == pytest.approx(34.5)
    assert weighted_total({"vqa": 100.0, "clip": 30.0, "aesthetic": 60.0}, w) == pytest.approx(34.5)


def test_explicit_weights_and_their_errors():
    w = resolve_weights("custom", "clip=0.5, pickscore=0.5")
    assert weighted_total({"clip": 20.0, "pickscore": 40.0}, w) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="weights_preset='custom'"):
        resolve_weights("paper", "clip=1")
    with pytest.raises(ValueError, match="is empty"):
        resolve_weights("custom", "")
    with pytest.raises(ValueError, match="not a number"):
        parse_weights("clip=high")
    with pytest.raises(ValueError, match="twice"):
        parse_weights("clip=1,clip=2")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_weights("papr")
    with pytest.raises(KeyError, match="'vqa' has weight 0.35"):
        weighted_total({"clip": 1.0, "aesthetic": 1.0}, resolve_weights("paper"))


def test_winner_and_loser_hand_computed():
    w = resolve_weights("paper")
    rows = [
        _row("p", 0, {"vqa": 80, "clip": 30, "aesthetic": 60}, w),   # 50.5
        _row("p", 1, {"vqa": 100, "clip": 25, "aesthetic": 50}, w),  # 35 + 13.75 + 5 = 53.75  <- winner
        _row("p", 2, {"vqa": 40, "clip": 32, "aesthetic": 70}, w),   # 14 + 17.6 + 7 = 38.6    <- loser
        _row("p", 3, {"vqa": 60, "clip": 31, "aesthetic": 40}, w),   # 21 + 17.05 + 4 = 42.05
    ]
    pairs, skipped = select_pairs({"p": _record("p")}, rows)
    assert skipped == {}
    (pair,) = pairs
    assert pair.kind == PAIR_AGFSYNC
    assert (pair.winner.candidate, pair.loser.candidate) == (1, 2)
    assert pair.winner.total == pytest.approx(53.75) and pair.loser.total == pytest.approx(38.6)
    assert pair.prompt == "prompt p" and pair.prompt_2 == ""
    # The paper's Eq. 9 ranks differently from CLIP alone (candidate 2 has the best CLIP score).
    assert max(rows, key=lambda r: r.scores["clip"]).candidate == 2


def test_ties_margin_and_too_few_are_skipped_and_counted():
    w = {"clip": 1.0}
    rows = [
        _row("tie", 0, {"clip": 20.0}, w), _row("tie", 1, {"clip": 20.0}, w),
        _row("close", 0, {"clip": 20.0}, w), _row("close", 1, {"clip": 20.5}, w),
        _row("far", 0, {"clip": 20.0}, w), _row("far", 1, {"clip": 25.0}, w), _row("far", 2, {"clip": 25.0}, w),
        _row("one", 0, {"clip": 20.0}, w),
    ]
    records = {pid: _record(pid) for pid in ("tie", "close", "far", "one", "unsampled")}
    pairs, skipped = select_pairs(records, rows, min_margin=1.0)
    assert skipped == {TIE: ["tie"], BELOW_MARGIN: ["close"], TOO_FEW: ["one", "unsampled"]}
    (pair,) = pairs
    # Tied best candidates: the lower index wins, deterministically.
    assert (pair.record.id, pair.winner.candidate, pair.loser.candidate) == ("far", 1, 0)
    pairs, skipped = select_pairs(records, rows, min_margin=0.0)
    assert [p.record.id for p in pairs] == ["close", "far"]
    assert skipped[TIE] == ["tie"]


def test_instruction_pair_gives_a_cross_pair():
    w = {"clip": 1.0}
    rec = _record("ie", kind="instruction_pair", prompt_2="a grey sea of flowers", divergence="aesthetic")
    rows = [
        _row("ie", 0, {"clip": 30.0}, w, instruction=0), _row("ie", 1, {"clip": 33.0}, w, instruction=0),
        _row("ie", 0, {"clip": 10.0}, w, instruction=1), _row("ie", 1, {"clip": 12.0}, w, instruction=1),
        _row("ie", 2, {"clip": 11.0}, w, instruction=1),
    ]
    records = {"ie": rec, "half": _record("half", kind="instruction_pair", prompt_2="x", divergence="aesthetic")}
    pairs, skipped = select_pairs(records, rows + [_row("half", 0, {"clip": 1.0}, w)], min_margin=50.0)
    (pair,) = pairs
    assert pair.kind == PAIR_CROSS
    # y1 = best image for instruction 1, y2 = best image for instruction 2 (the margin does not apply).
    assert (pair.winner.instruction, pair.winner.candidate) == (0, 1)
    assert (pair.loser.instruction, pair.loser.candidate) == (1, 1)
    assert pair.prompt == "prompt ie" and pair.prompt_2 == "a grey sea of flowers"
    assert skipped == {MISSING_INSTRUCTION: ["half"]}
