"""The evaluation in the layouts of the AGFSync paper's tables (section 5), from metrics.json.

    Table 1  win rates of finetuned over base per category (style) on CLIP, aesthetic, HPS v2
    Table 3  mean VQA score (the TIFA score on TIFA prompts) and aesthetic score, base and
             finetuned, with the change and the sum of changes
Table 2 (the VLM judge) is `judge_table`. A column appears only when its score was computed.
"""

from __future__ import annotations

from typing import Any

# score name in metrics -> column label of the paper.
TABLE1_COLUMNS = (("clip", "CLIP"), ("aesthetic", "Aes."), ("hps", "HPS v2"))
TABLE3_COLUMNS = (("vqa", "s_VQA"), ("aesthetic", "s_Aes."))


def table1_markdown(metrics: dict[str, Any]) -> str:
    rates = metrics["win_rates"]
    columns = [(k, label) for k, label in TABLE1_COLUMNS if k in rates["all"]]
    if not columns:
        return ""
    lines = ["### Table 1 format: win rates by category", "",
             "| category | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for cat, row in rates.items():
        label = f"**{cat}**" if cat == "all" else cat
        lines.append(f"| {label} | " + " | ".join(f"{100 * row[k]:.1f}%" for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def table3_markdown(metrics: dict[str, Any]) -> str:
    base, fine = metrics["scores"]["base"], metrics["scores"]["finetuned"]
    columns = [(k, label) for k, label in TABLE3_COLUMNS if k in base]
    if not columns:
        return ""
    deltas = [fine[k]["mean"] - base[k]["mean"] for k, _ in columns]
    lines = ["### Table 3 format: mean scores", "",
             "| model | " + " | ".join(label for _, label in columns) + " | Sum |", "|---" * (len(columns) + 2) + "|",
             "| base (no alignment) | " + " | ".join(f"{base[k]['mean']:.1f}" for k, _ in columns) + " | - |",
             "| finetuned | " + " | ".join(f"{fine[k]['mean']:.1f} ({d:+.1f})" for (k, _), d in zip(columns, deltas))
             + f" | {sum(deltas):+.1f} |"]
    return "\n".join(lines) + "\n"


def paper_tables_markdown(metrics: dict[str, Any]) -> str:
    parts = [t for t in (table1_markdown(metrics), table3_markdown(metrics)) if t]
    if not parts:
        return ""
    return "\n".join(["## In the paper's table formats", ""] + parts)
