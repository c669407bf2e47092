"""The judge's Table 2 markdown from summary.json, and its place in the eval report."""

import json

import numpy as np
import pytest
from PIL import Image

from agfsync_jax.evaluation import judge_table, report
from agfsync_jax.schemas import ScoreRow


def _question(text, label, wins, ties, losses, malformed=0, failed=0, p=0.5):
    judged = wins + ties + losses
    return {"question": text, "label": label, "wins": wins, "ties": ties, "losses": losses,
            "judged": judged, "skipped": {"malformed_answer": malformed, "request_failed": failed},
            "win_rate": wins / judged if judged else None, "p_one_sided": p if judged else None}


SUMMARY = {
    "model": "judge-vlm", "pairs": 9, "first_position_rate": 0.6,
    "questions": {
        "q1": _question("Which image do you prefer?", "general preference (General)", 5, 2, 1,
                        malformed=1, p=0.109375),
        "q2": _question("Which image better fits the text description?",
                        "prompt alignment (Faithful)", 2, 2, 4, failed=1, p=0.890625),
        "q3": _question("Disregarding the prompt, which image is more visually appealing?",
                        "visual appeal (Aesthetic)", 0, 0, 0, malformed=9),
    },
}


def test_markdown_rows_are_win_tie_lose_percent_and_p():
    md = judge_table.judge_markdown(SUMMARY)
    assert ('| Q1 general preference (General): "Which image do you prefer?" | 62.5% | 25.0% | '
            '12.5% | 8 | 1 / 0 | 0.109 |') in md
    assert ('| Q2 prompt alignment (Faithful): "Which image better fits the text description?" | '
            '25.0% | 25.0% | 50.0% | 8 | 0 / 1 | 0.891 |') in md
    # Nothing judged: no percentages, no p.
    assert ' | - | - | - | 0 | 9 / 0 | - |' in md
    assert "`judge-vlm`" in md and "0.600" in md


def test_load_summary_names_the_bad_key(tmp_path):
    path = tmp_path / "summary.json"
    broken = json.loads(json.dumps(SUMMARY))
    del broken["questions"]["q2"]["ties"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"summary.json: questions.q2.ties is missing"):
        judge_table.load_summary(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="summary.json: not valid JSON"):
        judge_table.load_summary(path)


def _item(tmp_path, i):
    paths = []
    for model in ("base", "fine"):
        p = tmp_path / f"{model}{i}.png"
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(p)
        paths.append(p)

    def row(total):
        return ScoreRow(prompt_id=f"p{i}", candidate=0, scores={"clip": total}, total=total,
                        scorers={"clip": "tiny"})

    return report.EvalItem(prompt_id=f"p{i}", category="c", prompt=f"prompt {i}", element_types=(),
                           base=row(1.0), finetuned=row(2.0), base_image=paths[0],
                           finetuned_image=paths[1])


def test_report_has_the_table_only_when_the_judge_ran(tmp_path):
    items = [_item(tmp_path, i) for i in range(2)]
    eval_dir = tmp_path / "eval"
    report.write_report(items, eval_dir, grid_prompts=2)
    assert "VLM judge" not in (eval_dir / "report.md").read_text()

    assert judge_table.summary_path(eval_dir) == eval_dir / "judge" / "summary.json"
    (eval_dir / "judge").mkdir()
    (eval_dir / "judge" / "summary.json").write_text(json.dumps(SUMMARY))
    report.write_report(items, eval_dir, grid_prompts=2)
    text = (eval_dir / "report.md").read_text()
    assert "## VLM judge: finetuned vs base (the paper's Table 2)" in text
    assert text.index("VLM judge") < text.index("## Side by side")
    assert '"Which image do you prefer?" | 62.5% |' in text
