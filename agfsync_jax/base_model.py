"""The run's base model: the folder every stage loads, and its identity for fingerprints.

    folder = resolve_base_model(config, workdir)   # always a local folder

`model.path` names a user's diffusers folder, local or gs:// (a remote one is loaded from its
local copy in the cache: `storage.local_copy`). With `model.tiny` set instead, the tiny model is
built on first use under WORKDIR/base_model (and pretrained when `model.tiny_pretrain_steps` >
0); the build is deterministic, so it is cached, and a cached one built with other settings is
refused rather than reused. In a gs:// work directory it is built in the system temp
directory and uploaded, its build record last (a folder without it is an upload that died).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from agfsync_jax import storage, workdir as workdir_lib
from agfsync_jax.errors import ConfigError
from agfsync_jax.storage import Path, PathLike
from agfsync_jax.tiny import build as tiny_build


def resolve_base_model(config: Any, workdir: PathLike) -> Path:
    """The local folder of a run's base model: `model.path` (or its local copy), or the tiny
    model under WORKDIR/base_model (or its local copy)."""
    if config.model.path and config.model.tiny:
        raise ConfigError("set either model.path or model.tiny, not both")
    if config.model.path:
        folder = storage.as_path(config.model.path)
        if not folder.exists():
            raise ConfigError(f"model.path={config.model.path!r} does not exist")
        return storage.local_copy(folder)
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


def folder_identity(folder: PathLike) -> str:
    """A cheap identity of a model folder: its config files' contents and its weight files'
    names and sizes. Changing weights, configs or the folder itself changes it; copying the
    folder elsewhere (another disk, a bucket) does not."""
    folder = storage.as_path(folder)
    if not folder.exists():
        raise ConfigError(f"model folder {folder} does not exist")
    h = hashlib.sha256()
    is_file = folder.is_file()
    # In pathlib's order (by path components), as identities recorded before were computed.
    names = [folder.name] if is_file else sorted(storage.list_files(folder), key=lambda n: n.split("/"))
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


def model_identity(config: Any) -> dict[str, Any]:
    """What identifies the run's base model in a stage fingerprint, without building it."""
    if config.model.path:
        return {"model.identity": folder_identity(config.model.path)}
    pretraining = tiny_build.Pretraining.from_config(config.model)
    return {"model.identity": json.dumps(tiny_build.build_record(config.model.tiny, config.seed, pretraining),
                                         sort_keys=True)}
