"""Whole-file reads and atomic writes on local disks and object stores alike.

A reader never sees a half-written file:

- local paths: a temp file in the same directory, fsync, rename (`os.replace`);
- object stores have no rename, but an object appears only once its upload completes, whole:
  the final object is uploaded once, from memory or from a temp file in the system temp
  directory (never the work directory), not streamed into place. A writer killed mid-upload leaves no object (or the previous one).

A directory of files (a model folder, an export) cannot appear at once on an object store; it
is committed by the stage's done marker, written last (docs/design.md section 13).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from agfsync_jax.storage.paths import PathLike, as_path, is_remote

def filesystem(path: PathLike) -> tuple[Any, str]:
    """(fsspec file system, path within it) serving `path`; for the few operations epath lacks."""
    import fsspec.core

    p = as_path(path)
    return fsspec.core.url_to_fs(os.fspath(p))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see module doc)."""
    p = as_path(path)
    if is_remote(p):
        fs, key = filesystem(p)
        fs.pipe_file(key, bytes(data))  # one upload from memory, no temp file
        return
    with atomic_writer(p) as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file that becomes `path` when the block ends without an exception.

    For files written piece by piece (TFRecord shards). Local: temp file beside `path`, fsync,
    rename. Remote: a temp file in the system temp directory, uploaded when the block ends.
    """
    p = as_path(path)
    if is_remote(p):
        with tempfile.NamedTemporaryFile(prefix="agfsync-upload-", suffix=".tmp") as f:
            yield f
            f.flush()
            fs, key = filesystem(p)
            fs.put_file(f.name, key)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(p.parent), prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(p))
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temp file behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    return as_path(path).read_text(encoding="utf-8")


def read_json(path: PathLike) -> Any:
    return json.loads(read_text(path))


def read_npy(path: PathLike) -> Any:
    """A .npy array (never pickles)."""
    import numpy as np

    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def open_image(path: PathLike) -> Any:
    """A decoded PIL image (fully loaded: a truncated file fails here, not later)."""
    from PIL import Image

    im = Image.open(io.BytesIO(read_bytes(path)))
    im.load()
    return im


def size(path: PathLike) -> int:
    """The size of a file in bytes."""
    p = as_path(path)
    if is_remote(p):
        fs, key = filesystem(p)
        return int(fs.size(key))
    return os.stat(os.fspath(p)).st_size


def remove(path: PathLike, missing_ok: bool = True) -> None:
    as_path(path).unlink(missing_ok=missing_ok)


def rmtree(path: PathLike, missing_ok: bool = True) -> None:
    """Removes a directory (local) or every object under a prefix (remote)."""
    p = as_path(path)
    if is_remote(p):
        fs, key = filesystem(p)
        names = fs.find(key)  # by prefix: fs.rm would glob-expand names holding "[" or "*"
        if not names and not missing_ok:
            raise FileNotFoundError(os.fspath(p))
        for name in names:
            fs.rm_file(name)
        return
    if p.exists() or not missing_ok:
        shutil.rmtree(os.fspath(p))


def list_files(folder: PathLike) -> list[str]:
    """Relative names ("unet/config.json") of every file under `folder`, sorted."""
    p = as_path(folder)
    if is_remote(p):
        fs, key = filesystem(p)
        key = key.rstrip("/")
        return sorted(f[len(key) + 1:] for f in fs.find(key) if f.startswith(key + "/"))
    root = os.fspath(p)
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(out)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies every file under `src` to the same relative name under `dst` (local or remote,
    either way). Not atomic as a whole: commit the result with a marker written after it."""
    s, d = as_path(src), as_path(dst)
    names = list_files(s)
    if not is_remote(s) and not is_remote(d):
        shutil.copytree(os.fspath(s), os.fspath(d), dirs_exist_ok=True)
        return
    if is_remote(d):
        fs, key = filesystem(d)
        key = key.rstrip("/")
        if is_remote(s):
            sfs, skey = filesystem(s)
            for name in names:
                sfs.copy(f"{skey.rstrip('/')}/{name}", f"{key}/{name}")
        else:
            for name in names:
                fs.put_file(os.path.join(os.fspath(s), name), f"{key}/{name}")
        return
    fs, key = filesystem(s)
    key = key.rstrip("/")
    for name in names:
        target = os.path.join(os.fspath(d), name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(f"{key}/{name}", target)
