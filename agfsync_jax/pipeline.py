"""`agfsync-jax pipeline`: prompts -> sample -> score -> train -> export -> eval.

Runs the pipeline stages of `agfsync_jax.stages` in order, each in its own process
(`agfsync_jax.stage_runner`: JAX and the PyTorch scorers never share one, so neither starves the
other of GPU memory). Every stage decides for itself whether it is complete with the current
settings (its done marker and fingerprint), so a re-run after a crash continues at the first
unfinished stage, a re-run of a finished pipeline does no work, and a changed setting is
noticed by the stage it affects.
"""

from __future__ import annotations

import json
import time
from typing import Any

from agfsync_jax import stage_runner, stages, storage


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def run(config: Any, workdir: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    start = time.time()
    for i, stage in enumerate(stages.PIPELINE, start=1):
        _banner(f"[{i}/{len(stages.PIPELINE)}] {stage.name}")
        t0 = time.time()
        result = stage_runner.run_in_child(stage.name, config, workdir)
        summary[stage.name] = {"seconds": round(time.time() - t0, 1), **result}
    _banner(f"pipeline done in {time.time() - start:.0f} s")
    for name, result in summary.items():
        print(f"  {name:<8} {json.dumps(result, default=str)[:160]}")
    report = summary.get("eval", {}).get("report") or str(storage.as_path(workdir) / "eval" / "report.md")
    print(f"\nreport: {report}", flush=True)
    return summary
