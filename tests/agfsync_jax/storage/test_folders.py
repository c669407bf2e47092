"""Folders built, published and copied locally, with a remote folder's copy keyed by its listing."""

from __future__ import annotations

import pytest

from agfsync_jax import storage


def _build(tmp):
    (tmp / "unet").mkdir(parents=True, exist_ok=True)
    (tmp / "unet" / "config.json").write_text('{"layers": 2}')
    (tmp / "weights.bin").write_bytes(b"0123")


def test_a_remote_folder_is_committed_last(gcs_emulator):
    out = storage.as_path(gcs_emulator.url("folders", "tiny_models"))
    assert not storage.is_complete(out)
    storage.build_folder(out, _build)
    assert storage.is_complete(out)
    assert gcs_emulator.object_names("folders/tiny_models/") == [
        "folders/tiny_models/.complete", "folders/tiny_models/unet/config.json", "folders/tiny_models/weights.bin"]
    with pytest.raises(FileExistsError):
        storage.build_folder(out, _build)


def test_a_local_folder_appears_whole(tmp_path):
    out = tmp_path / "models" / "tiny"

    def fail(tmp):
        _build(tmp)
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        storage.build_folder(out, fail)
    assert not out.exists() and not list((tmp_path / "models").iterdir())
    storage.build_folder(out, _build)
    assert sorted(storage.list_files(out)) == ["unet/config.json", "weights.bin"]


def test_local_copy_is_cached_and_follows_changes(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.folders.CACHE_ENV, str(tmp_path / "cache"))
    remote = storage.as_path(gcs_emulator.url("folders", "model"))
    storage.copy_tree(storage.build_folder(tmp_path / "src", _build), remote)
    first = storage.local_copy(remote)
    assert str(first).startswith(str(tmp_path / "cache")) and (first / "weights.bin").read_bytes() == b"0123"
    assert storage.local_copy(remote) == first
    storage.write_bytes(remote / "weights.bin", b"3210")  # same size, other bytes
    second = storage.local_copy(remote)
    assert second != first and (second / "weights.bin").read_bytes() == b"3210"
    local = tmp_path / "src"
    assert storage.local_copy(local) == storage.as_path(local)
