"""Atomic writes and whole-file reads, locally and on a GCS emulator."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from agfsync_jax import storage


def _png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 7, np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return storage.as_path(tmp_path)
    emulator = request.getfixturevalue("gcs_emulator")
    return storage.as_path(emulator.url("files", request.node.name))


def test_reads_and_writes(root):
    storage.write_json(root / "a" / "x.json", {"b": [1, 2]})
    assert storage.read_json(root / "a" / "x.json") == {"b": [1, 2]}
    latent = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    buf = io.BytesIO()
    np.save(buf, latent)
    storage.write_bytes(root / "l.npy", buf.getvalue())
    np.testing.assert_array_equal(storage.read_npy(root / "l.npy"), latent)
    storage.write_bytes(root / "i.png", _png())
    assert storage.open_image(root / "i.png").size == (8, 8)
    storage.write_bytes(root / "bad.png", _png()[:40])
    with pytest.raises(OSError):
        storage.open_image(root / "bad.png")
    assert storage.size(root / "i.png") == len(_png())
    assert storage.list_files(root) == ["a/x.json", "bad.png", "i.png", "l.npy"]
    storage.rmtree(root / "a")
    assert not (root / "a" / "x.json").exists()


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(root):
    target = root / "shard.bin"
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(target) as f:
            f.write(b"new, half")
            raise RuntimeError("killed mid-write")
    assert storage.read_bytes(target) == b"old"
    assert storage.list_files(root) == ["shard.bin"]  # no temp file either
    with storage.atomic_writer(target) as f:
        f.write(b"new")
    assert storage.read_bytes(target) == b"new"


def test_copy_tree_both_ways(gcs_emulator, tmp_path):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "config.json").write_text("{}")
    (src / "model_index.json").write_text('{"a": 1}')
    remote = storage.as_path(gcs_emulator.url("copy", "folder"))
    storage.copy_tree(src, remote)
    assert gcs_emulator.object_names("copy/") == ["copy/folder/model_index.json", "copy/folder/unet/config.json"]
    back = tmp_path / "back"
    storage.copy_tree(remote, back)
    assert (back / "unet" / "config.json").read_text() == "{}" and (back / "model_index.json").is_file()
