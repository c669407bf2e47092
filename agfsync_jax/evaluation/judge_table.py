"""The VLM judge's table for the eval report, in the layout of the paper's Table 2.

Reads the judge stage's artifact WORKDIR/eval/<set>/judge/summary.json, so the report needs nothing
from the stage that wrote it.
"""

from __future__ import annotations

import json
from typing import Any

from agfsync_jax import storage, workdir as workdir_lib
from agfsync_jax.storage import Path, PathLike

_QUESTION_FIELDS = {"question": str, "label": str, "wins": int, "ties": int, "losses": int,
                     "judged": int, "skipped": dict}


def summary_path(eval_dir: PathLike) -> Path:
    """<set>/judge/summary.json for the report of the eval set directory <set>."""
    return storage.as_path(eval_dir) / workdir_lib.JUDGE_SUMMARY


def load_summary(path: PathLike) -> dict[str, Any]:
    """The judge summary, checked for every field the table uses (errors name file and key)."""
    path = storage.as_path(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); re-run the judge stage") from e
    questions = summary.get("questions") if isinstance(summary, dict) else None
    if not isinstance(questions, dict) or not questions:
        raise ValueError(f"{path}: no 'questions' object; re-run the judge stage")
    for key, q in questions.items():
        for field, kind in _QUESTION_FIELDS.items():
            if not isinstance(q, dict) or not isinstance(q.get(field), kind):
                raise ValueError(f"{path}: questions.{key}.{field} is missing or not a "
                                 f"{kind.__name__}; re-run the judge stage")
        p = q.get("p_one_sided")
        if p is not None and not isinstance(p, (int, float)):
            raise ValueError(f"{path}: questions.{key}.p_one_sided is not a number or null")
    return summary


def _percent(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "-"


def judge_markdown(summary: dict[str, Any]) -> str:
    """Q1/Q2/Q3 rows: win / tie / lose percentages of the finetuned model, and the sign test."""
    model = summary.get("model", "?")
    lines = ["## VLM judge: finetuned vs base (the paper's Table 2)", "",
             f"Judge `{model}`; {summary.get('pairs', '?')} prompt pairs, same seed. Each question "
             "is asked with both image orders; a pair whose two answers disagree is a tie (the "
             "judge followed the position). Percentages are of the judged pairs; p is the "
             "one-sided exact sign test of wins against losses (ties dropped).", "",
             "| question | win | tie | lose | judged | skipped (malformed / failed) | p |",
             "|---|---|---|---|---|---|---|"]
    for key, q in summary["questions"].items():
        n = q["judged"]
        p = q.get("p_one_sided")
        skipped = q["skipped"]
        lines.append(
            f"| {key.upper()} {q['label']}: \"{q['question']}\" | {_percent(q['wins'], n)} | "
            f"{_percent(q['ties'], n)} | {_percent(q['losses'], n)} | {n} | "
            f"{skipped.get('malformed_answer', 0)} / {skipped.get('request_failed', 0)} | "
            f"{'-' if p is None else f'{p:.3g}'} |")
    rate = summary.get("first_position_rate")
    if rate is not None:
        lines += ["", f"Share of valid answers naming Image 1: {rate:.3f} (0.5 for a judge without "
                  "position bias)."]
    lines.append("")
    return "\n".join(lines)
