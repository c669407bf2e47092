"""Preference pairs from scored candidates (AGFSync Eqs. 6-7; InstructEngine section 3.3.2).

AGFSync: for each prompt, winner = the highest total, loser = the lowest (ties between
candidates broken by the lower candidate index, so the choice is deterministic). A prompt whose
best and worst tie, or differ by less than `min_margin`, gives no pair: it carries no preference.

InstructEngine (kind "instruction_pair"): y1 = the best candidate of instruction 1 (scored against
instruction 1), y2 = the best of instruction 2. One "cross" pair encodes both triples the
cross-validation loss uses: prompt = instruction 1 with winner y1 over loser y2, and
prompt_2 = instruction 2 with y2 over y1. The margin does not apply: y1 and y2 were scored under
different texts, so their totals are not comparable.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping

from agfsync_jax.schemas import KIND_INSTRUCTION_PAIR, PAIR_AGFSYNC, PAIR_CROSS, PromptRecord, ScoreRow

# Reasons a prompt yields no pair (keys of the skip counts).
TIE = "tie"
BELOW_MARGIN = "below_margin"
TOO_FEW = "too_few_candidates"
MISSING_INSTRUCTION = "missing_instruction_candidates"


@dataclasses.dataclass(frozen=True)
class Pair:
    kind: str  # PAIR_AGFSYNC or PAIR_CROSS
    record: PromptRecord
    winner: ScoreRow
    loser: ScoreRow

    @property
    def prompt(self) -> str:
        """The text under which the winner wins."""
        return self.record.prompt

    @property
    def prompt_2(self) -> str:
        """Cross pairs: the text under which the loser wins; empty otherwise."""
        return self.record.prompt_2 if self.kind == PAIR_CROSS else ""


def _best(rows: list[ScoreRow]) -> ScoreRow:
    return min(rows, key=lambda r: (-r.total, r.candidate))


def _worst(rows: list[ScoreRow]) -> ScoreRow:
    return min(rows, key=lambda r: (r.total, r.candidate))


def select_pairs(records: Mapping[str, PromptRecord], rows: Iterable[ScoreRow],
                 min_margin: float = 0.0) -> tuple[list[Pair], dict[str, list[str]]]:
    """Pairs sorted by prompt id, and {reason: [prompt ids]} of the prompts of `records` that gave
    none (a prompt without any scored candidate counts as too few / missing an instruction)."""
    if min_margin < 0:
        raise ValueError(f"scoring.min_margin must be >= 0, got {min_margin}")
    by_prompt: dict[str, dict[int, list[ScoreRow]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in rows:
        if row.prompt_id not in records:
            raise KeyError(f"score row for unknown prompt id {row.prompt_id!r}")
        by_prompt[row.prompt_id][row.instruction].append(row)
    pairs: list[Pair] = []
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    for pid in sorted(records):
        record, per_instruction = records[pid], by_prompt[pid]
        if record.kind == KIND_INSTRUCTION_PAIR:
            if not per_instruction.get(0) or not per_instruction.get(1):
                skipped[MISSING_INSTRUCTION].append(pid)
                continue
            pairs.append(Pair(PAIR_CROSS, record, _best(per_instruction[0]), _best(per_instruction[1])))
            continue
        cands = per_instruction.get(0, [])
        if len(cands) < 2:
            skipped[TOO_FEW].append(pid)
            continue
        winner, loser = _best(cands), _worst(cands)
        if winner.total == loser.total:
            skipped[TIE].append(pid)
        elif winner.total - loser.total < min_margin:
            skipped[BELOW_MARGIN].append(pid)
        else:
            pairs.append(Pair(PAIR_AGFSYNC, record, winner, loser))
    return pairs, dict(skipped)
