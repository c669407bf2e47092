"""`agfsync-jax clean STAGE --workdir=DIR`: remove a stage's artifacts so the next run redoes it.

What a stage wrote goes; what is expensive to recreate and cannot be wrong stays: the prompts
stage's LLM response cache (a cached answer is the answer the endpoint gave to that exact
request). Later stages notice on their next run that their input changed (their fingerprints
include it).
"""

from __future__ import annotations

from typing import Any

from agfsync_jax import stages, storage, workdir as workdir_lib
from agfsync_jax.errors import ConfigError

# Kept by `clean prompts`: relative to WORKDIR/prompts.
_KEEP = {workdir_lib.PROMPTS: ("llm_cache",)}


def run_clean(stage: str, workdir: str) -> dict[str, Any]:
    owned = {s.name: s.owns for s in stages.STAGES if s.owns}
    if stage not in owned:
        raise ConfigError(f"clean: {stage!r} is not a stage with artifacts; one of {', '.join(owned)}")
    wd = storage.as_path(workdir)
    removed: list[str] = []
    for name in owned[stage]:
        path = wd / name
        if not path.exists():
            continue
        keep = _KEEP.get(name, ())
        for child in sorted(path.iterdir()):
            if child.name in keep:
                continue
            storage.rmtree(child) if child.is_dir() else storage.remove(child)
            removed.append(str(child))
        if not keep and not storage.is_remote(path):
            path.rmdir()  # an object store has no empty folders
    kept = [str(wd / name / k) for name in owned[stage] for k in _KEEP.get(name, ()) if (wd / name / k).exists()]
    print(f"clean {stage}: removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} under {wd}"
          + (f"; kept {', '.join(kept)}" if kept else ""))
    return {"removed": removed, "kept": kept}
