"""The single-threaded TFRecord frame counter behind the TFDS split info."""

from __future__ import annotations

import pytest

from data_prep.scoring.tfds_metadata import count_tfrecord


def _write(path, payloads):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for p in payloads:
            writer.write(p)


def test_counts_records_and_payload_bytes_like_tensorflow(tmp_path):
    import tensorflow as tf

    payloads = [b"", b"a" * 7, bytes(range(256)) * 3]
    path = tmp_path / "x.tfrecord"
    _write(path, payloads)
    assert count_tfrecord(path) == (3, sum(len(p) for p in payloads))
    assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == 3  # the oracle agrees


@pytest.mark.parametrize("cut", [1, 5, 13])
def test_a_truncated_file_is_named(tmp_path, cut):
    path = tmp_path / "pairs.tfrecord-00000-of-00001"
    _write(path, [b"x" * 40, b"y" * 40])
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(ValueError, match=r"pairs\.tfrecord-00000-of-00001: truncated TFRecord"):
        count_tfrecord(path)
