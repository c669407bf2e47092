"""The report files: metrics.json, report.md with the win-rate table, grids and plot as PNG."""

import json

import numpy as np
from PIL import Image

from agfsync_jax.evaluation import report
from agfsync_jax.schemas import ScoreRow


def _row(pid, total, vqa, answers):
    return ScoreRow(prompt_id=pid, candidate=0, scores={"clip": total, "vqa": vqa}, total=total,
                    scorers={"clip": "tiny", "vqa": "tiny:likelihood"}, vqa_answers=answers)


def test_write_report(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        paths = []
        for model in ("base", "fine"):
            p = tmp_path / f"{model}{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
            paths.append(p)
        items.append(report.EvalItem(
            prompt_id=f"p{i}", category="cats" if i < 3 else "dogs", prompt=f"prompt {i} " * 10,
            element_types=("color", "object"), base=_row(f"p{i}", 10.0, 50.0, (1.0, 0.0)),
            finetuned=_row(f"p{i}", 11.0 if i != 5 else 9.0, 60.0, (1.0, 1.0)),
            base_image=paths[0], finetuned_image=paths[1]))
    metrics = report.write_report(items, tmp_path / "eval", grid_prompts=5)
    assert metrics["win_rates"]["cats"]["total"] == 1.0
    assert metrics["win_rates"]["all"]["total"] == 5 / 6
    assert metrics["vqa_accuracy_by_element_type"]["finetuned"]["object"]["accuracy"] == 1.0
    assert metrics["vqa_accuracy_by_element_type"]["base"]["object"]["accuracy"] == 0.0
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["files"]["grids"] == ["grid_00.png", "grid_01.png"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| **all** |" in md and "![grid](grid_00.png)" in md and "0.833" in md
    grid = Image.open(tmp_path / "eval" / "grid_00.png")
    assert grid.size[0] == 2 * report.GRID_CELL + 24 and grid.size[1] > 4 * report.GRID_CELL
    assert Image.open(tmp_path / "eval" / "win_rates.png").size[0] > 300
