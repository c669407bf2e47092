"""TFRecord framing in Python against TensorFlow's own writer and reader (the oracle)."""

from __future__ import annotations

import pytest

from agfsync_jax import storage
from agfsync_jax.storage import tfrecord
from agfsync_jax.tf_cpu import tensorflow_cpu_only

RECORDS = [b"", b"a", b"\x00\xff" * 5000, bytes(range(256))]


def test_bytes_equal_tensorflows_and_tensorflow_reads_them(tmp_path):
    tf = tensorflow_cpu_only()
    ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "theirs.tfrecord"
    assert tfrecord.write_records(ours, RECORDS) == len(RECORDS)
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for r in RECORDS:
            writer.write(r)
    assert ours.read_bytes() == theirs.read_bytes()
    assert [bytes(x.numpy()) for x in tf.data.TFRecordDataset(str(ours))] == RECORDS


def test_random_access_checks_both_checksums(tmp_path):
    path = tmp_path / "r.tfrecord"
    tfrecord.write_records(path, RECORDS)
    offsets = tfrecord.scan_record_offsets(path)
    reader = tfrecord.RecordReader(path)
    assert [reader.read(o) for o in reversed(offsets)] == RECORDS[::-1]
    data = bytearray(path.read_bytes())
    data[offsets[2] + 12 + 100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(tfrecord.RecordFileError, match="data checksum mismatch"):
        tfrecord.RecordReader(path).read(offsets[2])
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(tfrecord.RecordFileError, match="truncated TFRecord file: record 3"):
        tfrecord.scan_record_offsets(path)


def test_remote_records_round_trip(gcs_emulator):
    path = storage.as_path(gcs_emulator.url("tfrecord", "shard.tfrecord"))
    tfrecord.write_records(path, RECORDS)
    reader = tfrecord.RecordReader(path)
    assert [reader.read(o) for o in tfrecord.scan_record_offsets(path)] == RECORDS
