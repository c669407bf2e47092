"""Atomic file writes and appendable JSONL: the names earlier code uses, served by `agfsync_jax.storage`.

Local paths: temp file in the same directory, fsync, rename. Object stores (gs://): one upload
per file (an object appears whole), JSONL logs as part objects. See `agfsync_jax.storage` and
docs/design.md section 13; new code may import from `storage` directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agfsync_jax.storage import files
from agfsync_jax.storage.jsonl import JsonlAppender, read_complete_lines, write_jsonl
from agfsync_jax.storage.paths import PathLike

__all__ = ["JsonlAppender", "atomic_write_bytes", "atomic_write_json", "atomic_write_jsonl", "atomic_write_text",
           "read_complete_lines"]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    files.write_bytes(path, data)


def atomic_write_text(path: PathLike, text: str) -> None:
    files.write_text(path, text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    files.write_json(path, obj)


def atomic_write_jsonl(path: PathLike, rows: Iterable[dict[str, Any]]) -> None:
    write_jsonl(path, rows)
