"""Stages in child processes: the PyTorch scorers never share a process with JAX's allocator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agfsync_jax import main, stage_runner
from configs import tiny

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_child_stage_gets_the_parents_resolved_config_and_returns_its_summary(tmp_path):
    config = tiny.get_config()
    config.prompts.per_category = 1
    config.prompts.min_questions = 1
    summary = stage_runner.run_in_child("prompts", config, tmp_path)
    assert summary["prompts"] == 12 and summary["fingerprint"]
    # The child computed the same fingerprint the parent would: the config arrived whole.
    from data_prep.prompts.stage import fingerprint

    assert summary["fingerprint"] == fingerprint(config)


def test_the_child_command_and_environment(tmp_path):
    cmd = stage_runner.child_command("score", tmp_path / "c.json", "gs://b/run")
    assert cmd[:4] == [sys.executable, "-m", "agfsync_jax.main", "score"]
    assert cmd[4] == f"--config={REPO / 'configs' / 'resolved.py'}:{tmp_path / 'c.json'}"
    env = stage_runner.child_environment(tmp_path / "s.json")
    assert env[main.SUMMARY_ENV] == str(tmp_path / "s.json") and env["PYTHONPATH"].split(":")[0] == str(REPO)


@pytest.mark.slow
def test_the_scoring_stage_process_never_imports_jax():
    proc = _python("import sys; import data_prep.scoring.stage, data_prep.scoring.factory; "
                   "print(json.dumps(sorted(m for m in ('jax', 'jaxlib', 'flax') if m in sys.modules)))"
                   .replace("import sys;", "import sys, json;"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


@pytest.mark.slow
def test_the_pipeline_process_itself_imports_neither_jax_nor_torch(tmp_path):
    """Every stage runs in a child: the orchestrating process holds no accelerator memory."""
    code = f"""
import json, sys
from agfsync_jax import pipeline, stage_runner
from configs import tiny
calls = []
stage_runner.run_in_child = lambda stage, config, workdir: calls.append(stage) or {{}}
pipeline.run(tiny.get_config(), {str(tmp_path)!r})
print(json.dumps({{"calls": calls, "loaded": sorted(m for m in ("jax", "torch", "tensorflow") if m in sys.modules)}}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"calls": ["prompts", "sample", "score", "train", "export", "eval"], "loaded": []}


@pytest.mark.slow
def test_a_failing_child_raises_naming_the_stage(tmp_path):
    from agfsync_jax.errors import StageFailedError

    with pytest.raises(StageFailedError, match="stage sample failed in its process"):
        stage_runner.run_in_child("sample", tiny.get_config(), tmp_path / "empty")  # no prompts there
