"""Running a stage in a child process, with exactly the parent's resolved config.

    summary = run_in_child("score", config, workdir)

The pipeline and `eval` run every stage this way. Each stage then gets a fresh process: the
PyTorch scorers never share a process with JAX (whose GPU allocator reserves most of the
device's memory for the life of its process), and every device, thread pool and file handle a
stage held is released when it ends. The child is `python -m agfsync_jax.main STAGE` with the
config written as JSON (`configs/resolved.py`); its summary comes back through a file named by
`SUMMARY_ENV`. Its output streams to ours; a failure raises with its exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from agfsync_jax.errors import StageFailedError

# Where a child leaves its stage's summary (read by agfsync_jax.main). Defined here, not imported
# from main: under `python -m agfsync_jax.main` that import would load main a second time and
# define its flags twice.
SUMMARY_ENV = "AGFSYNC_SUMMARY_OUT"
# The child's exit status for a UserError (agfsync_jax.main.USER_ERROR_EXIT).
_USER_ERROR_EXIT = 2


def resolved_config_file() -> Path:
    import configs

    return Path(configs.__file__).resolve().parent / "resolved.py"


def child_command(stage: str, config_json: str | Path, workdir: str) -> list[str]:
    return [sys.executable, "-m", "agfsync_jax.main", stage,
            f"--config={resolved_config_file()}:{config_json}", f"--workdir={workdir}"]


def child_environment(summary_path: str | Path) -> dict[str, str]:
    env = dict(os.environ)
    env[SUMMARY_ENV] = str(summary_path)
    # The repository root first, so that the child imports the same code as the parent.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_in_child(stage: str, config: Any, workdir: str | Path) -> dict[str, Any]:
    """Runs `agfsync-jax STAGE` on `config` in a new process; returns its summary."""
    with tempfile.TemporaryDirectory(prefix=f"agfsync-{stage}-") as tmp:
        config_json = Path(tmp) / "config.json"
        config_json.write_text(json.dumps(config.to_dict(), default=str))
        summary_path = Path(tmp) / "summary.json"
        proc = subprocess.run(child_command(stage, config_json, str(workdir)),
                              env=child_environment(summary_path), check=False)
        if proc.returncode != 0:
            detail = "the error is printed above" if proc.returncode == _USER_ERROR_EXIT else "see its output above"
            raise StageFailedError(f"stage {stage} failed in its process (exit status {proc.returncode}); {detail}")
        return json.loads(summary_path.read_text()) if summary_path.is_file() else {}
