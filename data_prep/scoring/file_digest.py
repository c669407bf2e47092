"""Content digests of model files, for scorer `version` strings.

A scorer's version is written next to every score it makes (ScoreRow.scorers), and the stage
refuses to mix stored scores with a scorer whose version differs. A version built from file
names alone would not change when a file is replaced by other weights of the same name, so the
scorers that use this module put a digest of the bytes (and of their config) in the version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20
DIGEST_CHARS = 16


def digest(files: Iterable[tuple[str, Path]], extra: Iterable[str] = ()) -> str:
    """sha256 over (label, bytes) of each file in the given order, then the `extra` strings;
    the first DIGEST_CHARS hex digits. Labels keep a renamed file inside a folder distinct."""
    h = hashlib.sha256()
    for label, path in files:
        h.update(f"file:{label}:{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    for text in extra:
        h.update(f"extra:{len(text)}:{text}\0".encode())
    return h.hexdigest()[:DIGEST_CHARS]


def folder_digest(root: Path, extra: Iterable[str] = ()) -> str:
    """digest() of every file under `root`, labelled by relative path, in sorted order."""
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    return digest(files, extra)
