"""Win / tie / loss of the finetuned model per question, with the one-sided exact sign test."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

from agfsync_jax.evaluation.statistics import sign_test
from data_prep.judge import protocol
from data_prep.judge.pairs import ImagePair

RowKey = tuple[str, str, str]  # (prompt_id, question key, order)

_SIGN = {"win": 1.0, "tie": 0.0, "loss": -1.0}


def row_key(row: Mapping[str, Any]) -> RowKey:
    return (row["prompt_id"], row["question"], row["order"])


def question_summary(q: protocol.Question, pairs: Sequence[ImagePair],
                     rows: Mapping[RowKey, Mapping[str, Any]]) -> dict[str, Any]:
    outcomes = collections.Counter()
    for pair in pairs:
        pair_rows = [rows[(pair.prompt_id, q.key, order)] for order in protocol.ORDERS]
        outcomes[protocol.pair_outcome(pair_rows)] += 1
    wins, ties, losses = outcomes["win"], outcomes["tie"], outcomes["loss"]
    judged = wins + ties + losses
    signs = [_SIGN[o] for o in ("win", "tie", "loss") for _ in range(outcomes[o])]
    # Wins against losses; an order disagreement (tie) carries no direction.
    p = sign_test(signs, [0.0] * judged)["p_one_sided"] if judged else None
    return {
        "question": q.text, "label": q.label,
        "wins": wins, "ties": ties, "losses": losses, "judged": judged,
        "skipped": {protocol.MALFORMED: outcomes[protocol.MALFORMED],
                    protocol.FAILED: outcomes[protocol.FAILED]},
        "win_rate": wins / judged if judged else None,
        "tie_rate": ties / judged if judged else None,
        "loss_rate": losses / judged if judged else None,
        "p_one_sided": p,
    }


def summarize(pairs: Sequence[ImagePair], rows: Mapping[RowKey, Mapping[str, Any]],
              skipped_prompts: Mapping[str, int]) -> dict[str, Any]:
    """The summary.json body (without run metadata such as the judge model)."""
    statuses = collections.Counter(r["status"] for r in rows.values())
    answered = [r for r in rows.values() if r["status"] == protocol.ANSWERED]
    first = sum(1 for r in answered if r["raw_answer"].strip() == "1")
    return {
        "pairs": len(pairs),
        "skipped_prompts": dict(sorted(skipped_prompts.items())),
        "rows": {s: statuses[s] for s in (protocol.ANSWERED, protocol.MALFORMED, protocol.FAILED)},
        # Share of valid answers naming Image 1: far from 0.5 means a position-biased judge.
        "first_position_rate": first / len(answered) if answered else None,
        "questions": {q.key: question_summary(q, pairs, rows) for q in protocol.QUESTIONS},
    }
