"""The run's base model: the folder every stage loads, and its identity for fingerprints.

    folder = resolve_base_model(config, workdir)   # always a local folder

`model.path` names a user's diffusers folder, local or gs:// (a remote one is loaded from its
local copy in the cache: `storage.local_copy`), or a single-file checkpoint converted once into a
cached diffusers folder (`models.single_file`; kept locally when the work directory is remote).
With `model.tiny` set instead, the tiny model is built on first use under WORKDIR/base_model (and
pretrained when `model.tiny_pretrain_steps` > 0); the build is deterministic, so it is cached,
and a cached one built with other settings is refused rather than reused. In a gs:// work
directory it is built in the system temp directory and uploaded, its build record last (a folder
without it is an upload that died).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from agfsync_jax import storage, workdir as workdir_lib
from agfsync_jax.errors import ConfigError
from agfsync_jax.models import single_file
from agfsync_jax.storage import Path, PathLike
from agfsync_jax.tiny import build as tiny_build


# model.* fields that a stage fingerprint need not list: the tiny pretraining settings are part of
# `model_identity`, and where single-file conversions are cached changes nothing.
COVERED_BY_IDENTITY = ("model.tiny_pretrain_steps", "model.tiny_pretrain_batch_size",
                       "model.tiny_pretrain_learning_rate", "model.single_file_cache")


def resolve_base_model(config: Any, workdir: PathLike) -> Path:
    """The local folder of a run's base model: `model.path` (its local copy when remote, its
    conversion when a single file), or the tiny model under WORKDIR/base_model (its local copy)."""
    if config.model.path and config.model.tiny:
        raise ConfigError("set either model.path or model.tiny, not both")
    if config.model.path:
        path = storage.as_path(config.model.path)
        if not path.exists():
            raise ConfigError(f"model.path={config.model.path!r} does not exist")
        local = storage.local_copy(path)
        if single_file.is_single_file(local):
            # Conversions are read by local loaders: a remote work directory keeps them in the cache.
            remote = storage.is_remote(config.model.single_file_cache or workdir)
            root = storage.cache_root() / "single_file" if remote else single_file.cache_root(config.model, workdir)
            return single_file.converted_folder(local, root, config.model.single_file_config)
        return local
    if not config.model.tiny:
        raise ConfigError("no base model: set model.path (a diffusers folder) or model.tiny (sd1|sdxl)")
    out = storage.as_path(workdir) / workdir_lib.BASE_MODEL
    pretraining = tiny_build.Pretraining.from_config(config.model)
    expected = tiny_build.build_record(config.model.tiny, config.seed, pretraining)
    if storage.is_remote(out) and out.exists() and not (out / tiny_build.BUILD_RECORD).is_file():
        storage.rmtree(out)  # an upload that died before its build record: never complete
    if out.exists():
        tiny_build.check_build(out, expected)
    else:
        tiny_build.save_tiny_pipeline(config.model.tiny, out, seed=config.seed, pretraining=pretraining)
    return storage.local_copy(out)


def resolve_base_model_on_every_process(config: Any, workdir: PathLike) -> Path:
    """`resolve_base_model` for code that every process runs: a tiny model is built by process 0
    only and the others wait for it (several builders would race for WORKDIR/base_model)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        resolve_base_model(config, workdir)
    multihost_utils.sync_global_devices("agfsync:base_model")
    return resolve_base_model(config, workdir)


def folder_identity(folder: PathLike, exclude: PathLike | None = None) -> str:
    """A cheap identity of a model folder (or a dataset): its config files' contents and its
    other files' names and sizes. Changing weights, configs or the folder itself changes it;
    copying the folder elsewhere (another disk, a bucket) does not. Files under `exclude` (e.g. a
    work directory kept inside a dataset folder) do not count."""
    folder = storage.as_path(folder)
    if not folder.exists():
        raise ConfigError(f"folder {folder} does not exist")
    h = hashlib.sha256()
    is_file = folder.is_file()
    # In pathlib's order (by path components), as identities recorded before were computed.
    names = [folder.name] if is_file else sorted(storage.list_files(folder), key=lambda n: n.split("/"))
    if exclude is not None and not is_file:
        names = [n for n in names if not _is_under(folder / n, exclude)]
    for rel in names:
        if rel.startswith(".") or "/." in rel:
            continue
        p = folder if is_file else folder / rel
        h.update(rel.encode())
        if p.suffix == ".json" or p.suffix == ".txt":
            h.update(p.read_bytes())
        else:
            h.update(str(storage.size(p)).encode())
    return h.hexdigest()[:16]


def _is_under(path: Path, folder: PathLike) -> bool:
    if storage.is_remote(path) or storage.is_remote(folder):
        return str(path).startswith(str(folder).rstrip("/") + "/")
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep)


def model_identity(config: Any) -> dict[str, Any]:
    """What identifies the run's base model in a stage fingerprint, without building it."""
    if config.model.path:
        return {"model.identity": folder_identity(config.model.path)}
    pretraining = tiny_build.Pretraining.from_config(config.model)
    return {"model.identity": json.dumps(tiny_build.build_record(config.model.tiny, config.seed, pretraining),
                                         sort_keys=True)}
