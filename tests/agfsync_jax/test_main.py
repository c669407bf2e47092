"""The console script: subcommands from the stage table, and errors for people."""

from __future__ import annotations

import pytest

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.py")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agfsync_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_usage_lists_every_stage_of_the_table():
    from agfsync_jax import stages

    proc = _cli("--help")
    assert proc.returncode == 0
    for stage in stages.STAGES:
        assert f"  {stage.name} " in proc.stderr


@pytest.mark.slow
def test_a_user_error_is_one_line_with_the_fix_and_exit_status_2(tmp_path):
    proc = _cli("export", f"--config={CONFIG}", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("agfsync-jax export: error:")]
    assert len(lines) == 1 and "run the `train` stage first" in lines[0]
    assert "Traceback" not in proc.stderr
    log = proc.stderr.split("(traceback: ")[1].split(";")[0]
    assert "MissingInputError" in Path(log).read_text()
    verbose = _cli("export", f"--config={CONFIG}", f"--workdir={tmp_path}", "--verbose")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    code = f"""
import sys, types
from agfsync_jax import main, stages
module = types.ModuleType("broken_stage")
def run(config, workdir):
    raise RuntimeError("a bug, not a user error")
module.run = run
sys.modules["broken_stage"] = module
stages.BY_NAME["broken"] = stages.Stage("broken", "broken_stage", "test", light=True)
sys.argv = ["agfsync-jax", "broken", "--config={CONFIG}", "--workdir={tmp_path}"]
main.run()
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug, not a user error" in proc.stderr
