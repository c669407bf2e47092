"""The run's base model: the folder every stage loads, and its identity for fingerprints.

    folder = resolve_base_model(config, workdir)

`model.path` names a user's diffusers folder, or a single-file checkpoint converted once into a
cached diffusers folder (`models.single_file`). With `model.tiny` set instead, the tiny model is
built on first use under WORKDIR/base_model (and pretrained when `model.tiny_pretrain_steps` > 0);
the build is deterministic, so it is cached, and a cached one built with other settings is
refused rather than reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.errors import ConfigError
from agfsync_jax.models import single_file
from agfsync_jax.tiny import build as tiny_build


# model.* fields that a stage fingerprint need not list: the tiny pretraining settings are part of
# `model_identity`, and where single-file conversions are cached changes nothing.
COVERED_BY_IDENTITY = ("model.tiny_pretrain_steps", "model.tiny_pretrain_batch_size",
                       "model.tiny_pretrain_learning_rate", "model.single_file_cache")


def resolve_base_model(config: Any, workdir: str | Path) -> Path:
    """The base model folder of a run: `model.path`, or the tiny model under WORKDIR/base_model."""
    if config.model.path and config.model.tiny:
        raise ConfigError("set either model.path or model.tiny, not both")
    if config.model.path:
        if single_file.is_single_file(config.model.path):
            return single_file.converted_folder(config.model.path, single_file.cache_root(config.model, workdir),
                                                config.model.single_file_config)
        return Path(config.model.path)
    if not config.model.tiny:
        raise ConfigError("no base model: set model.path (a diffusers folder) or model.tiny (sd1|sdxl)")
    out = Path(workdir) / workdir_lib.BASE_MODEL
    pretraining = tiny_build.Pretraining.from_config(config.model)
    if out.exists():
        tiny_build.check_build(out, tiny_build.build_record(config.model.tiny, config.seed, pretraining))
    else:
        tiny_build.save_tiny_pipeline(config.model.tiny, out, seed=config.seed, pretraining=pretraining)
    return out


def resolve_base_model_on_every_process(config: Any, workdir: str | Path) -> Path:
    """`resolve_base_model` for code that every process runs: a tiny model is built by process 0
    only and the others wait for it (several builders would race for WORKDIR/base_model)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        resolve_base_model(config, workdir)
    multihost_utils.sync_global_devices("agfsync:base_model")
    return resolve_base_model(config, workdir)


def folder_identity(folder: str | Path, exclude: str | Path | None = None) -> str:
    """A cheap identity of a model folder (or a dataset): its config files' contents and its
    other files' names and sizes. Changing weights, configs or the folder itself changes it;
    copying the folder elsewhere does not. Files under `exclude` (e.g. a work directory kept
    inside a dataset folder) do not count."""
    folder = Path(folder)
    if not folder.exists():
        raise ConfigError(f"folder {folder} does not exist")
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    if exclude is not None:
        skip = Path(exclude).resolve()
        files = [p for p in files if not p.resolve().is_relative_to(skip)]
    for p in files:
        rel = p.name if folder.is_file() else str(p.relative_to(folder))
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode())
        if p.suffix == ".json" or p.suffix == ".txt":
            h.update(p.read_bytes())
        else:
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def model_identity(config: Any) -> dict[str, Any]:
    """What identifies the run's base model in a stage fingerprint, without building it."""
    if config.model.path:
        return {"model.identity": folder_identity(config.model.path)}
    pretraining = tiny_build.Pretraining.from_config(config.model)
    return {"model.identity": json.dumps(tiny_build.build_record(config.model.tiny, config.seed, pretraining),
                                         sort_keys=True)}
