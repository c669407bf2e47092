"""metrics.json, report.md, side-by-side image grids and the win-rate bar plot."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from agfsync_jax import storage
from agfsync_jax.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from agfsync_jax.evaluation import judge_table, paper_tables, statistics
from agfsync_jax.schemas import ScoreRow
from agfsync_jax.storage import Path, PathLike

GRID_CELL = 192  # pixels per image in the grids: tiny models' 32 px images are upscaled


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One prompt evaluated with the same seed on both models."""

    prompt_id: str
    category: str
    prompt: str
    element_types: tuple[str, ...]  # of the prompt's questions; checked against the VQA answers
    base: ScoreRow
    finetuned: ScoreRow
    base_image: Path
    finetuned_image: Path


def compute_metrics(items: Sequence[EvalItem], seed: int = 0) -> dict[str, Any]:
    if not items:
        raise ValueError("no evaluation items")
    names = sorted(set(items[0].base.scores) | {"total"})

    def column(model: str, name: str) -> list[float]:
        rows = [getattr(it, model) for it in items]
        return [r.total if name == "total" else r.scores[name] for r in rows]

    base = {n: column("base", n) for n in names}
    fine = {n: column("finetuned", n) for n in names}
    metrics: dict[str, Any] = {
        "num_prompts": len(items),
        "scores": {model: {n: statistics.mean_ci(vals[n], seed=seed) for n in names}
                   for model, vals in (("base", base), ("finetuned", fine))},
        "win_rates": statistics.win_rates_by_category([it.category for it in items], fine, base),
        "sign_tests": {n: statistics.sign_test(fine[n], base[n]) for n in names},
    }
    if all(it.base.vqa_answers and it.finetuned.vqa_answers for it in items):
        for it in items:
            for model in ("base", "finetuned"):
                got = tuple(a.element_type for a in getattr(it, model).vqa_answers)
                if got != tuple(it.element_types):
                    raise ValueError(f"prompt {it.prompt_id!r}: the {model} model's VQA answers have element types "
                                     f"{got}, but the prompt's questions have {tuple(it.element_types)}")
        metrics["vqa_scorer"] = items[0].base.scorers.get("vqa", "")
        metrics["vqa_accuracy_by_element_type"] = {
            model: statistics.accuracy_by_element_type(a for it in items for a in getattr(it, model).vqa_answers)
            for model in ("base", "finetuned")}
    return metrics


def _caption_font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def side_by_side_grid(items: Sequence[EvalItem], cell: int = GRID_CELL) -> Image.Image:
    """Rows of (base | finetuned) with the prompt and both totals as caption."""
    pad, caption_h, header_h = 8, 44, 28
    width = 2 * cell + 3 * pad
    height = header_h + len(items) * (cell + caption_h + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = _caption_font(13)
    draw.text((pad, 6), "base", fill="black", font=_caption_font(16))
    draw.text((2 * pad + cell, 6), "finetuned", fill="black", font=_caption_font(16))
    y = header_h
    for it in items:
        for col, path in enumerate((it.base_image, it.finetuned_image)):
            img = storage.open_image(path).convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(img, (pad + col * (cell + pad), y))
        text = it.prompt if len(it.prompt) <= 60 else it.prompt[:57] + "..."
        draw.text((pad, y + cell + 4), text, fill="black", font=font)
        draw.text((pad, y + cell + 22),
                  f"total {it.base.total:.2f}  |  {it.finetuned.total:.2f}", fill="dimgray", font=font)
        y += cell + caption_h + pad
    return grid


def win_rate_plot(win_rates: dict[str, dict[str, float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(win_rates)
    names = list(next(iter(win_rates.values())))
    x = np.arange(len(categories))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(categories) + 2), 4))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [win_rates[c][name] for c in categories], width, label=name)
    ax.axhline(0.5, color="black", lw=1, ls="--")
    ax.set_xticks(x + width * (len(names) - 1) / 2, categories, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate, finetuned over base")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _prompt_set_lines(prompt_set: dict[str, Any] | None) -> list[str]:
    if not prompt_set:
        return []
    by_cat = ", ".join(f"{c} {n}/{m}" for c, (n, m) in prompt_set["by_category"].items())
    seen = prompt_set.get("dropped_seen_in_training")
    return [f"Prompt set `{prompt_set['name']}` ({prompt_set['source']}): {prompt_set['selected']} of "
            f"{prompt_set['available']} prompts, drawn stratified by category ({by_cat})"
            + (f"; {seen} prompt(s) that training saw were left out" if seen else "") + ".", ""]


def _markdown(metrics: dict[str, Any], grid_files: Sequence[str], plot_file: str, title: str,
              judge_md: str = "") -> str:
    lines = [f"# {title}", "", f"{metrics['num_prompts']} prompts, same seed for base and finetuned.", ""]
    lines += _prompt_set_lines(metrics.get("prompt_set"))
    lines += ["## Mean scores (95% bootstrap CI)", "", "| score | base | finetuned |", "|---|---|---|"]
    for name, base in metrics["scores"]["base"].items():
        fine = metrics["scores"]["finetuned"][name]
        lines.append(f"| {name} | {base['mean']:.3f} [{base['ci_low']:.3f}, {base['ci_high']:.3f}] | "
                     f"{fine['mean']:.3f} [{fine['ci_low']:.3f}, {fine['ci_high']:.3f}] |")
    rates = metrics["win_rates"]
    names = list(next(iter(rates.values())))
    lines += ["", "## Win rates of finetuned over base (ties count 1/2)", "",
              "| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for cat, row in rates.items():
        label = f"**{cat}**" if cat == "all" else cat
        lines.append(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    lines += ["", "Per score over all prompts: wins / losses / ties of finetuned, and the one-sided sign-test "
              "p-value (how often a fair coin per untied prompt wins at least as often):", ""]
    for name, t in metrics["sign_tests"].items():
        lines.append(f"- {name}: {t['wins']} / {t['losses']} / {t['ties']}, p = {t['p_one_sided']:.3g}")
    lines += ["", f"![win rates]({plot_file})", ""]
    lines += ["## VQA accuracy by element type (TIFA-style)", ""]
    if "vqa_accuracy_by_element_type" in metrics:
        acc = metrics["vqa_accuracy_by_element_type"]
        lines += [f"Fraction of questions answered correctly, by the question's element type "
                  f"(VQA scorer `{metrics['vqa_scorer']}`; in likelihood mode the answer is yes when "
                  "P(yes) > 0.5). Mean credit is each question's share of the VQA score: P(expected "
                  "answer) in likelihood mode, the same as accuracy in generate mode.", "",
                  "| element type | questions | base accuracy | finetuned accuracy | base mean credit | "
                  "finetuned mean credit |", "|---|---|---|---|---|---|"]
        for t, b in acc["base"].items():
            f = acc["finetuned"][t]
            label = f"**{t}**" if t == "all" else t
            lines.append(f"| {label} | {b['questions']} | {b['accuracy']:.3f} | {f['accuracy']:.3f} | "
                         f"{b['mean_credit']:.3f} | {f['mean_credit']:.3f} |")
    else:
        lines.append("Not available: the score rows hold no per-question VQA answers (VQA not scored).")
    lines.append("")
    tables = paper_tables.paper_tables_markdown(metrics)
    if tables:
        lines.append(tables)
    if judge_md:
        lines.append(judge_md)
    lines += ["## Side by side (base | finetuned)", ""] + [f"![grid]({g})" for g in grid_files] + [""]
    return "\n".join(lines)


def write_report(items: Sequence[EvalItem], out_dir: PathLike, grid_prompts: int = 8, seed: int = 0,
                 title: str = "agfsync-jax evaluation", prompt_set: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes metrics.json, report.md, the grids and the plot to `out_dir`; `prompt_set` is the
    selection summary (`prompt_selection.stratified_sample`) the report states."""
    out_dir = storage.as_path(out_dir)
    metrics = compute_metrics(items, seed=seed)
    if prompt_set is not None:
        metrics["prompt_set"] = prompt_set
    grid_files = []
    for start in range(0, min(grid_prompts, len(items)), 4):
        name = f"grid_{start // 4:02d}.png"
        buf = io.BytesIO()
        side_by_side_grid(items[start:min(start + 4, grid_prompts)]).save(buf, format="PNG")
        atomic_write_bytes(out_dir / name, buf.getvalue())
        grid_files.append(name)
    atomic_write_bytes(out_dir / "win_rates.png", win_rate_plot(metrics["win_rates"]))
    metrics["files"] = {"grids": grid_files, "win_rate_plot": "win_rates.png", "report": "report.md"}
    atomic_write_json(out_dir / "metrics.json", metrics)
    # The judge's table when the judge stage has run (WORKDIR/eval/judge/summary.json).
    judge_summary = judge_table.summary_path(out_dir)
    judge_md = (judge_table.judge_markdown(judge_table.load_summary(judge_summary))
                if judge_summary.is_file() else "")
    atomic_write_text(out_dir / "report.md", _markdown(metrics, grid_files, "win_rates.png", title, judge_md))
    return metrics
