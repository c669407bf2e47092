"""The test emulator keeps every byte of an upload (tests/gcs_emulator_server.py)."""

import pytest


@pytest.mark.parametrize("tail", [b"\r", b"\n", b"\r\n", b"\n\r", b"x"])
def test_an_upload_reads_back_byte_for_byte(gcs_emulator, tail):
    from agfsync_jax import storage

    data = bytes(range(256)) + b"\r\n\n\r" + tail
    path = storage.as_path(gcs_emulator.url("emulator-test", f"blob-{tail.hex()}"))
    storage.write_bytes(path, data)
    assert storage.read_bytes(path) == data and storage.size(path) == len(data)
