"""A stage's done marker: WORKDIR/<stage>/_DONE.json, written last, atomically.

Its presence means "complete": the pipeline skips the stage and later stages may read its
artifacts. It holds the stage's summary, the fingerprint of the settings the artifacts were made
with and those settings (so a mismatch can name the fields that changed). A stage that fails
writes no marker and removes a stale one before redoing work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agfsync_jax import fingerprint, storage
from agfsync_jax.storage import Path, PathLike
from agfsync_jax.errors import StageChangedError
from agfsync_jax.workdir import DONE_MARKER

FINGERPRINT = "fingerprint"
SETTINGS = "settings"


def path(stage_dir: PathLike) -> Path:
    return storage.as_path(stage_dir) / DONE_MARKER


def is_done(stage_dir: PathLike) -> bool:
    return path(stage_dir).is_file()


def read(stage_dir: PathLike) -> dict[str, Any] | None:
    """The marker's contents, or None when the stage is not complete."""
    p = path(stage_dir)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        # Written atomically, so this is damage, not a crash mid-write.
        raise StageChangedError(f"{p} is not valid JSON ({e.msg}); delete it to redo the stage") from e


def write(stage_dir: PathLike, summary: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> None:
    body = dict(summary)
    if settings is not None:
        body[FINGERPRINT] = fingerprint.digest(settings)
        body[SETTINGS] = dict(settings)
    storage.write_json(path(stage_dir), body)


def clear(stage_dir: PathLike) -> None:
    path(stage_dir).unlink(missing_ok=True)


def changed_fields(marker: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """Fields whose values differ between a marker and the current settings ([] when equal)."""
    if marker.get(FINGERPRINT) == fingerprint.digest(settings):
        return []
    if SETTINGS not in marker:
        return ["<no settings recorded: made by an older version>"]
    return fingerprint.changed_fields(marker[SETTINGS], settings) or ["<fingerprint>"]


def redo_hint(stage: str, workdir: PathLike) -> str:
    return f"`agfsync-jax clean {stage} --workdir={workdir}` then re-run, or use another workdir"


def check(stage: str, stage_dir: PathLike, settings: Mapping[str, Any], workdir: PathLike
          ) -> dict[str, Any] | None:
    """The marker when the stage is complete with these settings; None when it is not complete.

    Raises `StageChangedError` naming the changed fields and the command that redoes the stage
    when it is complete with other settings.
    """
    marker = read(stage_dir)
    if marker is None:
        return None
    changed = changed_fields(marker, settings)
    if not changed:
        return marker
    shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
    raise StageChangedError(f"{stage}: {path(stage_dir)} was made with other settings ({shown} changed); "
                            f"{redo_hint(stage, workdir)}")
