"""TFDS metadata for the hand-written pair shards, so `tfds.builder_from_directory` loads them.

tensorflow-datasets 4.9.10 needs a `tfds.core.ShardedFileTemplate` here (a plain template string
fails); the split info is computed from the shard files themselves.
"""

from __future__ import annotations

from pathlib import Path

from agfsync_jax.pair_dataset import tensorflow_cpu_only
from data_prep.scoring.pair_records import DATASET_NAME, FILE_FORMAT, SPLIT, shard_filename, tfds_features

DESCRIPTION = ("AGFSync/InstructEngine preference pairs: winner and loser latents (float16 bytes + "
               "shape), optional PNGs, and every score of both (scores_json).")


def write_tfds_metadata(pairs_dir: str | Path, shard_count: int) -> int:
    """Writes dataset_info.json and features.json for all `shard_count` shards; returns #pairs."""
    tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    pairs_dir = Path(pairs_dir)
    missing = [shard_filename(i, shard_count) for i in range(shard_count)
               if not (pairs_dir / shard_filename(i, shard_count)).is_file()]
    if missing:
        raise FileNotFoundError(f"{pairs_dir}: shards missing: {missing}")
    template = tfds.core.ShardedFileTemplate(data_dir=pairs_dir, dataset_name=DATASET_NAME, split=SPLIT,
                                             filetype_suffix=FILE_FORMAT)
    split_infos = tfds.folder_dataset.compute_split_info(filename_template=template)
    (info,) = split_infos
    if info.num_shards != shard_count:
        raise ValueError(f"{pairs_dir}: found {info.num_shards} shard files, expected {shard_count} "
                         "(files of an earlier run with another shard.count?)")
    tfds.folder_dataset.write_metadata(data_dir=pairs_dir, features=tfds_features(), split_infos=split_infos,
                                       filename_template=template, check_data=False, description=DESCRIPTION)
    return int(info.num_examples)
