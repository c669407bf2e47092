"""The eval stage on a finished (tiny) run: fail fast before sampling, one directory per prompt
set, the report says which prompts of how many, and a changed model is redone, not reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agfsync_jax import done_marker
from agfsync_jax.errors import ConfigError
from agfsync_jax.evaluation import stage
from configs import tiny

CATEGORIES = ("Colors", "Counting", "Positional", "Text")


def _drawbench(path: Path, per_category: int = 6) -> Path:
    """A DrawBench-layout CSV (the real file's header and quoting), `per_category` rows each."""
    rows = ["Prompts,Category"] + [f'"A {c.lower()} prompt number {i}, of {c}.",{c}'
                                   for c in CATEGORIES for i in range(per_category)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def finished(tmp_path, tiny_sd1_path) -> Path:
    """What eval reads of a finished run: an exported pipeline (here the base weights themselves)."""
    wd = tmp_path / "wd"
    shutil.copytree(tiny_sd1_path, wd / "export" / "pipeline")
    done_marker.write(wd / "export", {"pipeline": str(wd / "export" / "pipeline"), "step": 1}, {"inputs.train": "t"})
    return wd


def _config(base: Path, benchmark: Path, **eval_fields):
    c = tiny.get_config()
    c.model.tiny, c.model.path = "", str(base)
    c.eval.prompts_path, c.eval.prompts_format = str(benchmark), "drawbench"
    c.eval.num_prompts = 8
    c.eval.grid_prompts = 2
    c.sampling.steps = 2
    for k, v in eval_fields.items():
        setattr(c.eval, k, v)
    return c


def test_prompts_without_questions_under_a_vqa_weight_fail_before_sampling(finished, tiny_sd1_path, tmp_path):
    config = _config(tiny_sd1_path, _drawbench(tmp_path / "DrawBench.csv"))
    with pytest.raises(ConfigError, match=r"8 of 8 prompts .* have no questions.*VQA weight is 0.35.*"
                                          r"questions=llm.*weights_preset=released_code.*tifa_questions"):
        stage.run(config, str(finished))
    set_dir = next((finished / "eval").iterdir())
    assert not (set_dir / "base" / "candidates").exists()  # nothing was sampled


@pytest.mark.slow  # samples and scores both models in child processes
def test_eval_report_states_the_draw_and_a_second_benchmark_gets_its_own_directory(finished, tiny_sd1_path, tmp_path):
    bench = _drawbench(tmp_path / "DrawBench.csv")
    config = _config(tiny_sd1_path, bench)
    config.scoring.weights_preset = "released_code"  # DrawBench has no questions
    summary = stage.run(config, str(finished))
    set_dir = Path(summary["report"]).parent
    assert set_dir.parent == finished / "eval" and set_dir.name.startswith("drawbench-")
    selection = json.loads((set_dir / "selection.json").read_text())
    assert selection["selected"] == 8 and selection["available"] == 24
    assert {c: n for c, (n, _) in selection["by_category"].items()} == {c: 2 for c in CATEGORIES}
    report = Path(summary["report"]).read_text()
    assert "8 of 24 prompts, drawn stratified by category (Colors 2/6, Counting 2/6" in report
    # Identical weights on both sides: every prompt ties, and the report is still written.
    assert summary["sign_test_total"]["ties"] == 8

    again = stage.run(config, str(finished))
    assert again["report"] == summary["report"]  # complete: skipped

    other = _drawbench(tmp_path / "Other.csv", per_category=3)
    second_config = _config(tiny_sd1_path, other, num_prompts=4)
    second_config.scoring.weights_preset = "released_code"
    second = stage.run(second_config, str(finished))
    assert Path(second["report"]).parent != set_dir and Path(summary["report"]).is_file()
