"""The TFDS metadata writer counts the shards itself and refuses damaged or stray shards."""

from __future__ import annotations

import pytest

from agfsync_jax.pairs.records import shard_filename
from agfsync_jax.pairs.metadata import write_tfds_metadata


def _write(path, payloads):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for p in payloads:
            writer.write(p)


def test_split_info_counts_every_shard(tmp_path):
    import json

    for i, n in enumerate((3, 0, 2)):
        _write(tmp_path / shard_filename(i, 3), [b"x" * 10] * n)
    assert write_tfds_metadata(tmp_path, 3) == 5
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["splits"][0]["shardLengths"] == ["3", "0", "2"]


def test_a_truncated_shard_is_named(tmp_path):
    from agfsync_jax.pairs.records import PairDataError

    _write(tmp_path / shard_filename(0, 1), [b"x" * 40, b"y" * 40])
    victim = tmp_path / shard_filename(0, 1)
    victim.write_bytes(victim.read_bytes()[:-13])
    with pytest.raises(PairDataError, match=f"{victim.name}: truncated TFRecord file"):
        write_tfds_metadata(tmp_path, 1)


def test_shards_of_another_shard_count_are_refused(tmp_path):
    _write(tmp_path / shard_filename(0, 1), [b"x"])
    _write(tmp_path / shard_filename(1, 2), [b"x"])
    with pytest.raises(ValueError, match="another shard.count"):
        write_tfds_metadata(tmp_path, 1)
