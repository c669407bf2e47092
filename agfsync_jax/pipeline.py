"""`agfsync-jax pipeline`: prompts -> candidates -> scores/pairs -> train -> export -> eval.

Each stage runs only when its done marker is missing, so a re-run after a crash continues at
the first unfinished stage, and a re-run of a finished pipeline does no work. Completion is
read from the markers before any stage module (and so JAX or PyTorch) is imported.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

from agfsync_jax import workdir as workdir_lib

# (stage name, module, directory holding the done marker); in pipeline order.
PIPELINE: tuple[tuple[str, str, str], ...] = (
    ("prompts", "data_prep.prompts.stage", workdir_lib.PROMPTS),
    ("sample", "agfsync_jax.sampling.stage", workdir_lib.CANDIDATES),
    ("score", "data_prep.scoring.stage", workdir_lib.PAIRS),
    ("train", "agfsync_jax.training.stage", workdir_lib.TRAIN),
    ("export", "agfsync_jax.export", workdir_lib.EXPORT),
    ("eval", "agfsync_jax.evaluation.stage", workdir_lib.EVAL),
)


def is_complete(workdir: str | Path, stage_dir: str) -> bool:
    return (Path(workdir) / stage_dir / workdir_lib.DONE_MARKER).is_file()


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def run(config: Any, workdir: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    start = time.time()
    for i, (name, module, stage_dir) in enumerate(PIPELINE, start=1):
        if is_complete(workdir, stage_dir):
            print(f"[{i}/{len(PIPELINE)}] {name}: complete, skipped "
                  f"({Path(workdir) / stage_dir / workdir_lib.DONE_MARKER})", flush=True)
            summary[name] = "skipped (complete)"
            continue
        _banner(f"[{i}/{len(PIPELINE)}] {name}")
        t0 = time.time()
        result = importlib.import_module(module).run(config, workdir)
        if not is_complete(workdir, stage_dir):
            raise RuntimeError(f"stage {name} returned but wrote no done marker in {Path(workdir) / stage_dir}")
        summary[name] = {"seconds": round(time.time() - t0, 1), **(result or {})}
    report = Path(workdir) / workdir_lib.EVAL / "report.md"
    _banner(f"pipeline done in {time.time() - start:.0f} s")
    for name, result in summary.items():
        print(f"  {name:<8} {json.dumps(result, default=str)[:160]}")
    print(f"\nreport: {report.resolve()}", flush=True)
    return summary
