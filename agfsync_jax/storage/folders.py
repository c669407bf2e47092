"""Folders (model folders, exports) on local disks and object stores, and local copies of them.

    out = build_folder(WORKDIR / "scores" / "tiny_models", lambda tmp: save_models(tmp))
    if not is_complete(out): ...
    local = local_copy("gs://bucket/models/sd15")   # a local folder for from_pretrained & co.

A local folder is built in a temp directory beside it and renamed into place: it appears whole.
An object store cannot rename a folder, so there the folder is built in the system temp
directory, uploaded file by file, and `COMMIT` is written last: `is_complete` checks for it.

Model loaders (diffusers, transformers, safetensors) read local files only. `local_copy` gives
them a remote folder (or file) as a local one: downloaded once into the cache (`cache_root()`),
under a key made from every file's name, size and checksums as the object store lists them, so
a changed object is a new copy and an unchanged folder is never downloaded twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable

from etils import epath

from agfsync_jax.storage.files import copy_tree, filesystem, rmtree, write_bytes
from agfsync_jax.storage.paths import PathLike, as_path, is_remote

# Written last into a folder uploaded to an object store; a dot file, so model identities
# (agfsync_jax.base_model.folder_identity) and copies of the folder ignore it.
COMMIT = ".complete"
# Where local copies of remote folders go: $AGFSYNC_JAX_CACHE, else ~/.cache/agfsync-jax.
CACHE_ENV = "AGFSYNC_JAX_CACHE"


def is_complete(folder: PathLike) -> bool:
    """A local folder exists (it appeared whole); a remote one has its COMMIT object."""
    p = as_path(folder)
    return (p / COMMIT).is_file() if is_remote(p) else p.is_dir()


def publish_folder(local_dir: PathLike, out: PathLike) -> epath.Path:
    """Makes the finished local folder `local_dir` the folder `out` (moved locally, uploaded
    and committed remotely). `out` must not exist (remote: not be complete)."""
    src, dst = as_path(local_dir), as_path(out)
    if is_remote(dst):
        copy_tree(src, dst)
        write_bytes(dst / COMMIT, b"")
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(os.fspath(src), os.fspath(dst))
    return dst


def build_folder(out: PathLike, build: Callable[[epath.Path], None]) -> epath.Path:
    """Runs `build(tmp)` on an empty local directory and publishes it as `out`."""
    dst = as_path(out)
    if is_complete(dst):
        raise FileExistsError(f"{dst} already exists")
    if is_remote(dst):
        rmtree(dst)  # what an upload that died half-way left
        with tempfile.TemporaryDirectory(prefix="agfsync-build-") as tmp:
            build(epath.Path(tmp))
            return publish_folder(tmp, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.fspath(dst.parent), prefix=f".{dst.name}.")
    try:
        build(epath.Path(tmp))
        return publish_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root() -> epath.Path:
    return epath.Path(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "agfsync-jax"))


def remote_listing_key(folder: PathLike) -> str:
    """A digest of every file of a remote folder: name, size and the store's checksums."""
    fs, key = filesystem(folder)
    key = key.rstrip("/")
    listing = fs.find(key, detail=True)
    entries = sorted((name[len(key) + 1:], int(info.get("size", 0)), str(info.get("crc32c", "")),
                      str(info.get("md5Hash", info.get("ETag", ""))))
                     for name, info in listing.items() if name.startswith(key + "/"))
    if not entries:
        raise FileNotFoundError(f"{folder}: no such folder (no objects under it)")
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]


def local_copy(folder: PathLike) -> epath.Path:
    """`folder` itself when local; a remote folder's (or file's) local copy in the cache,
    downloaded once."""
    src = as_path(folder)
    if not is_remote(src):
        return src
    if src.is_file():
        return _local_file_copy(src)
    root = cache_root() / "folders"
    final = root / f"{remote_listing_key(src)}-{src.name}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.fspath(root), prefix=f".{final.name}.")
    try:
        copy_tree(src, tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tmp, COMMIT))
        try:
            os.rename(tmp, os.fspath(final))
        except OSError:
            if not final.is_dir():  # not another process that finished the same copy first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _local_file_copy(src: epath.Path) -> epath.Path:
    fs, key = filesystem(src)
    info = fs.info(key)
    digest = hashlib.sha256(json.dumps([int(info.get("size", 0)), str(info.get("crc32c", "")),
                                        str(info.get("md5Hash", info.get("ETag", "")))]).encode()).hexdigest()[:24]
    root = cache_root() / "files"
    final = root / f"{digest}-{src.name}"
    if final.is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(root), prefix=f".{final.name}.")
    os.close(fd)
    try:
        fs.get_file(key, tmp)
        os.replace(tmp, os.fspath(final))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return final
