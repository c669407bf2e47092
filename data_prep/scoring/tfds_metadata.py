"""TFDS metadata for the hand-written pair shards, so `tfds.builder_from_directory` loads them.

tensorflow-datasets 4.9.10 needs a `tfds.core.ShardedFileTemplate` here (a plain template string
fails). The split info is counted from the shard files themselves by walking the TFRecord frames
in this thread: `tfds.folder_dataset.compute_split_info` reads the shards with tf.data from a
thread pool, which crashed the interpreter (SIGSEGV inside TensorFlow) when JAX was loaded in the
same process.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from agfsync_jax.pair_dataset import tensorflow_cpu_only
from data_prep.scoring.pair_records import DATASET_NAME, FILE_FORMAT, SPLIT, shard_filename, tfds_features

DESCRIPTION = ("AGFSync/InstructEngine preference pairs: winner and loser latents (float16 bytes + "
               "shape), optional PNGs, and every score of both (scores_json).")

# A TFRecord frame: uint64 length, uint32 CRC of the length, the payload, uint32 CRC of the payload.
_LENGTH = struct.Struct("<Q")
_HEADER_BYTES = _LENGTH.size + 4
_FOOTER_BYTES = 4


def count_tfrecord(path: str | Path) -> tuple[int, int]:
    """(records, payload bytes) of one TFRecord file; a truncated file raises naming it."""
    path = Path(path)
    size = path.stat().st_size
    records = payload = offset = 0
    with path.open("rb") as f:
        while offset < size:
            header = f.read(_HEADER_BYTES)
            if len(header) < _HEADER_BYTES:
                raise ValueError(f"{path}: truncated TFRecord file (partial record header at byte {offset})")
            (length,) = _LENGTH.unpack_from(header)
            end = offset + _HEADER_BYTES + length + _FOOTER_BYTES
            if end > size:
                raise ValueError(f"{path}: truncated TFRecord file (record {records} at byte {offset} "
                                 f"needs {end - size} more bytes)")
            f.seek(length + _FOOTER_BYTES, os.SEEK_CUR)
            records, payload, offset = records + 1, payload + length, end
    return records, payload


def write_tfds_metadata(pairs_dir: str | Path, shard_count: int) -> int:
    """Writes dataset_info.json and features.json for all `shard_count` shards; returns #pairs."""
    tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    pairs_dir = Path(pairs_dir)
    missing = [shard_filename(i, shard_count) for i in range(shard_count)
               if not (pairs_dir / shard_filename(i, shard_count)).is_file()]
    if missing:
        raise FileNotFoundError(f"{pairs_dir}: shards missing: {missing}")
    prefix = f"{DATASET_NAME}-{SPLIT}.{FILE_FORMAT}-"
    shard_name = re.compile(re.escape(prefix) + r"\d{5}-of-\d{5}")
    stray = sorted(p.name for p in pairs_dir.iterdir()
                   if shard_name.fullmatch(p.name) and p.name not in
                   {shard_filename(i, shard_count) for i in range(shard_count)})
    if stray:
        raise ValueError(f"{pairs_dir}: found shard files {stray} besides the expected {shard_count} "
                         "(files of an earlier run with another shard.count?)")
    counts = [count_tfrecord(pairs_dir / shard_filename(i, shard_count)) for i in range(shard_count)]
    template = tfds.core.ShardedFileTemplate(data_dir=pairs_dir, dataset_name=DATASET_NAME, split=SPLIT,
                                             filetype_suffix=FILE_FORMAT)
    info = tfds.core.SplitInfo(name=SPLIT, shard_lengths=[n for n, _ in counts],
                               num_bytes=sum(b for _, b in counts), filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=pairs_dir, features=tfds_features(), split_infos=[info],
                                       filename_template=template, check_data=False, description=DESCRIPTION)
    return sum(n for n, _ in counts)
