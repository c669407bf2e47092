"""`agfsync-jax clean STAGE`: removes what the stage wrote, keeps the LLM cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agfsync_jax import clean
from agfsync_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_clean_score_removes_scores_and_pairs_only(tmp_path):
    for d in ("scores", "pairs", "candidates"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.json").write_text("{}")
    clean.run_clean("score", str(tmp_path))
    assert not (tmp_path / "scores").exists() and not (tmp_path / "pairs").exists()
    assert (tmp_path / "candidates" / "x.json").is_file()


def test_clean_prompts_keeps_the_llm_cache(tmp_path):
    (tmp_path / "prompts" / "llm_cache").mkdir(parents=True)
    (tmp_path / "prompts" / "llm_cache" / "a.json").write_text("{}")
    (tmp_path / "prompts" / "prompts.jsonl").write_text("")
    (tmp_path / "prompts" / "_DONE.json").write_text("{}")
    summary = clean.run_clean("prompts", str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "prompts").iterdir()) == ["llm_cache"]
    assert len(summary["removed"]) == 2


def test_clean_of_an_unknown_stage_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="one of .*prompts.*score"):
        clean.run_clean("scoer", str(tmp_path))


@pytest.mark.slow
def test_console_script_cleans_without_a_config(tmp_path):
    (tmp_path / "train").mkdir()
    proc = subprocess.run([sys.executable, "-m", "agfsync_jax.main", "clean", "train", f"--workdir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "train").exists() and "clean train: removed" in proc.stdout
