"""TFDS metadata for the hand-written pair shards, so `tfds.builder_from_directory` loads them.

tensorflow-datasets 4.9.10 needs a `tfds.core.ShardedFileTemplate` here (a plain template string
fails). The split info is counted from the shard files themselves by walking the TFRecord
frame headers in this thread (`agfsync_jax.pairs.records.scan_record_offsets`):
`tfds.folder_dataset.compute_split_info` reads the shards with tf.data from a thread pool, which
crashed the interpreter (SIGSEGV inside TensorFlow) when JAX was loaded in the same process.
"""

from __future__ import annotations

import re

from agfsync_jax import storage
from agfsync_jax.pairs.records import (DATASET_NAME, FILE_FORMAT, SPLIT, scan_record_offsets, shard_filename,
                                      tfds_features)
from agfsync_jax.storage import PathLike
from agfsync_jax.tf_cpu import tensorflow_cpu_only

DESCRIPTION = ("AGFSync/InstructEngine preference pairs: winner and loser latents (float16 bytes + "
               "shape), optional PNGs, and every score of both (scores_json).")


def write_tfds_metadata(pairs_dir: PathLike, shard_count: int) -> int:
    """Writes dataset_info.json and features.json for all `shard_count` shards; returns #pairs."""
    tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    pairs_dir = storage.as_path(pairs_dir)
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
    shards = [pairs_dir / shard_filename(i, shard_count) for i in range(shard_count)]
    template = tfds.core.ShardedFileTemplate(data_dir=pairs_dir, dataset_name=DATASET_NAME, split=SPLIT,
                                             filetype_suffix=FILE_FORMAT)
    lengths = [len(scan_record_offsets(path)) for path in shards]  # a truncated shard raises naming it
    info = tfds.core.SplitInfo(name=SPLIT, shard_lengths=lengths,
                               num_bytes=sum(storage.size(path) for path in shards), filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=pairs_dir, features=tfds_features(), split_infos=[info],
                                       filename_template=template, check_data=False, description=DESCRIPTION)
    return sum(lengths)
