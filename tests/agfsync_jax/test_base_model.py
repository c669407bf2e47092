"""The tiny base model in a gs:// work directory: built locally, uploaded (build record last),
loaded from one local copy, and refused when built with other settings."""

from __future__ import annotations

import pytest

from agfsync_jax import base_model, storage
from agfsync_jax.errors import ConfigError
from agfsync_jax.tiny import build as tiny_build


def _config(steps: int = 0):
    from configs import tiny

    config = tiny.get_config()
    config.model.tiny_pretrain_steps = steps
    return config


def test_tiny_model_in_a_bucket(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.folders.CACHE_ENV, str(tmp_path / "cache"))
    workdir = gcs_emulator.url("base-model-test", "run")
    local = base_model.resolve_base_model(_config(), workdir)
    names = gcs_emulator.object_names("base-model-test/run/base_model/")
    assert "base-model-test/run/base_model/model_index.json" in names
    assert "base-model-test/run/base_model/" + tiny_build.BUILD_RECORD in names
    assert not storage.is_remote(local) and str(local).startswith(str(tmp_path / "cache"))
    assert base_model.folder_identity(local) == base_model.folder_identity(storage.as_path(workdir) / "base_model")
    assert base_model.resolve_base_model(_config(), workdir) == local  # reused, not rebuilt
    with pytest.raises(ConfigError, match="pretrain_steps=0"):
        base_model.resolve_base_model(_config(steps=5), workdir)


def test_an_upload_without_its_build_record_is_rebuilt(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.folders.CACHE_ENV, str(tmp_path / "cache"))
    workdir = gcs_emulator.url("base-model-test", "torn")
    storage.write_text(storage.as_path(workdir) / "base_model" / "model_index.json", "{}")  # died mid-upload
    local = base_model.resolve_base_model(_config(), workdir)
    assert (local / "unet" / "config.json").is_file()
    assert tiny_build.read_build(storage.as_path(workdir) / "base_model")["pretrain_steps"] == 0
