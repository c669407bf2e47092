"""The report files: metrics.json, report.md with the win-rate table, grids and plot as PNG."""

import json

import numpy as np
from PIL import Image

import pytest

from agfsync_jax.evaluation import report
from agfsync_jax.schemas import ScoreRow, VqaAnswer

QUESTIONS = (("is the cat red?", "color"), ("is there a cat?", "object"))


def _answer(question, element_type, p_yes):
    """A likelihood-mode answer to a yes-question, as data_prep/scoring/vqa.py records it."""
    return VqaAnswer(question=question, element_type=element_type, expected="yes",
                     answer="yes" if p_yes > 0.5 else "no", is_yes=p_yes > 0.5, p_yes=p_yes,
                     correct=p_yes > 0.5, credit=p_yes)


def _row(pid, total, vqa, p_yes=()):
    answers = tuple(_answer(q, t, p) for (q, t), p in zip(QUESTIONS, p_yes))
    return ScoreRow(prompt_id=pid, candidate=0, scores={"clip": total, "vqa": vqa}, total=total,
                    scorers={"clip": "tiny", "vqa": "tiny:likelihood"}, vqa_answers=answers)


def _images(tmp_path, i):
    rng = np.random.default_rng(i)
    paths = []
    for model in ("base", "fine"):
        p = tmp_path / f"{model}{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_write_report(tmp_path):
    items = []
    for i in range(6):
        paths = _images(tmp_path, i)
        # base: color always right (P(yes) 0.9), object always wrong (0.2);
        # finetuned: color right on 4 of 6 prompts (0.7 or 0.4), object always right (0.6).
        items.append(report.EvalItem(
            prompt_id=f"p{i}", category="cats" if i < 3 else "dogs", prompt=f"prompt {i} " * 10,
            element_types=("color", "object"), base=_row(f"p{i}", 10.0, 50.0, (0.9, 0.2)),
            finetuned=_row(f"p{i}", 11.0 if i != 5 else 9.0, 60.0, (0.7 if i < 4 else 0.4, 0.6)),
            base_image=paths[0], finetuned_image=paths[1]))
    metrics = report.write_report(items, tmp_path / "eval", grid_prompts=5)
    assert metrics["win_rates"]["cats"]["total"] == 1.0
    assert metrics["win_rates"]["all"]["total"] == 5 / 6
    # 5 wins in 6 untied prompts: P(X >= 5), X ~ Binomial(6, 1/2) = 7/64.
    assert metrics["sign_tests"]["total"] == {"wins": 5, "losses": 1, "ties": 0, "p_one_sided": 7 / 64}
    acc = metrics["vqa_accuracy_by_element_type"]
    assert metrics["vqa_scorer"] == "tiny:likelihood"
    assert acc["base"] == {
        "color": {"questions": 6, "accuracy": 1.0, "mean_credit": pytest.approx(0.9)},
        "object": {"questions": 6, "accuracy": 0.0, "mean_credit": pytest.approx(0.2)},
        "all": {"questions": 12, "accuracy": 0.5, "mean_credit": pytest.approx(0.55)}}
    assert acc["finetuned"] == {
        "color": {"questions": 6, "accuracy": pytest.approx(4 / 6), "mean_credit": pytest.approx(3.6 / 6)},
        "object": {"questions": 6, "accuracy": 1.0, "mean_credit": pytest.approx(0.6)},
        "all": {"questions": 12, "accuracy": pytest.approx(10 / 12), "mean_credit": pytest.approx(7.2 / 12)}}
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["files"]["grids"] == ["grid_00.png", "grid_01.png"]
    assert on_disk["vqa_accuracy_by_element_type"]["finetuned"]["color"]["accuracy"] == pytest.approx(4 / 6)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| **all** |" in md and "![grid](grid_00.png)" in md and "0.833" in md
    assert "- total: 5 / 1 / 0, p = 0.109" in md
    # The per-element-type table: base and finetuned accuracy, then their mean credit.
    assert "## VQA accuracy by element type (TIFA-style)" in md
    assert "| element type | questions | base accuracy | finetuned accuracy |" in md
    assert "| color | 6 | 1.000 | 0.667 | 0.900 | 0.600 |" in md
    assert "| object | 6 | 0.000 | 1.000 | 0.200 | 0.600 |" in md
    assert "| **all** | 12 | 0.500 | 0.833 | 0.550 | 0.600 |" in md
    grid = Image.open(tmp_path / "eval" / "grid_00.png")
    assert grid.size[0] == 2 * report.GRID_CELL + 24 and grid.size[1] > 4 * report.GRID_CELL
    assert Image.open(tmp_path / "eval" / "win_rates.png").size[0] > 300


def test_report_without_vqa_answers_and_mismatched_element_types(tmp_path):
    paths = _images(tmp_path, 0)
    item = report.EvalItem(prompt_id="p0", category="cats", prompt="a cat", element_types=("color", "object"),
                           base=_row("p0", 10.0, 50.0), finetuned=_row("p0", 11.0, 60.0),
                           base_image=paths[0], finetuned_image=paths[1])
    metrics = report.write_report([item], tmp_path / "eval")
    assert "vqa_accuracy_by_element_type" not in metrics
    assert "Not available" in (tmp_path / "eval" / "report.md").read_text()
    # Answers whose element types are not the prompt's questions' belong to other questions.
    bad = report.EvalItem(prompt_id="p0", category="cats", prompt="a cat", element_types=("object", "color"),
                          base=_row("p0", 10.0, 50.0, (0.9, 0.2)), finetuned=_row("p0", 11.0, 60.0, (0.9, 0.2)),
                          base_image=paths[0], finetuned_image=paths[1])
    with pytest.raises(ValueError, match="prompt 'p0': the base model's VQA answers have element types"):
        report.compute_metrics([bad])


def test_paper_table_formats_from_metrics():
    from agfsync_jax.evaluation import paper_tables

    metrics = {
        "win_rates": {"anime": {"clip": 0.6, "aesthetic": 0.774, "hps": 0.5, "total": 0.6},
                      "all": {"clip": 0.572, "aesthetic": 0.667, "hps": 0.55, "total": 0.6}},
        "scores": {"base": {"vqa": {"mean": 76.6}, "aesthetic": {"mean": 44.6}},
                   "finetuned": {"vqa": {"mean": 77.9}, "aesthetic": {"mean": 47.9}}},
    }
    t1 = paper_tables.table1_markdown(metrics)
    assert "| category | CLIP | Aes. | HPS v2 |" in t1 and "| anime | 60.0% | 77.4% | 50.0% |" in t1
    t3 = paper_tables.table3_markdown(metrics)
    # The paper's SD v1.4 row: 77.9 (+1.3), 47.9 (+3.3), sum +4.6.
    assert "| finetuned | 77.9 (+1.3) | 47.9 (+3.3) | +4.6 |" in t3
    del metrics["win_rates"]["all"]["hps"], metrics["win_rates"]["anime"]["hps"]
    assert "HPS v2" not in paper_tables.table1_markdown(metrics)
