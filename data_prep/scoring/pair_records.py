"""Pair records: the TFDS features of the pair dataset and TFRecord shard writing.

Both the features here and the training reader (agfsync_jax.pair_dataset) are built from
schemas.PAIR_FEATURES, and examples are serialized by TFDS's own serializer, so
`tfds.builder_from_directory` decodes what we write. Latents are stored as float16 bytes
(C-order) plus their shape: half the size of float32, and SD latents (|x| < ~10) lose nothing
that matters for DPO at float16's 11-bit precision.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.pair_dataset import tensorflow_cpu_only
from agfsync_jax.schemas import LATENT_DTYPE, PAIR_FEATURES
from data_prep.scoring.pairs import Pair

DATASET_NAME = "agfsync_pairs"
SPLIT = "train"
FILE_FORMAT = "tfrecord"
# PAIR_FEATURES kind -> (TFDS tensor shape, numpy dtype).
_TFDS_KINDS: dict[str, tuple[tuple[int | None, ...], Any]] = {
    "bytes": ((), np.bytes_),
    "int": ((), np.int64),
    "float": ((), np.float32),
    "int_list": ((None,), np.int64),
}


def shard_filename(shard_index: int, shard_count: int) -> str:
    """TFDS's default naming: {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}."""
    return f"{DATASET_NAME}-{SPLIT}.{FILE_FORMAT}-{workdir_lib.shard_suffix(shard_index, shard_count)}"


def tfds_features() -> Any:
    """The tfds.features.FeaturesDict of a pair record, from schemas.PAIR_FEATURES."""
    tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    specs = {}
    for name, kind in PAIR_FEATURES.items():
        if kind not in _TFDS_KINDS:
            raise ValueError(f"PAIR_FEATURES[{name!r}] has unknown kind {kind!r}")
        shape, dtype = _TFDS_KINDS[kind]
        specs[name] = tfds.features.Tensor(shape=shape, dtype=dtype)
    return tfds.features.FeaturesDict(specs)


def encode_latent(latent: np.ndarray) -> tuple[bytes, list[int]]:
    """(C, H, W) float latent -> (float16 C-order bytes, shape)."""
    if latent.ndim != 3:
        raise ValueError(f"latent must be (C, H, W), got shape {latent.shape}")
    half = np.ascontiguousarray(latent.astype(LATENT_DTYPE))
    return half.tobytes(), [int(d) for d in half.shape]


def pair_example(pair: Pair, winner_latent: np.ndarray, loser_latent: np.ndarray,
                 winner_png: bytes = b"", loser_png: bytes = b"") -> dict[str, Any]:
    """The feature dict of one pair; keys are exactly PAIR_FEATURES."""
    w_bytes, w_shape = encode_latent(winner_latent)
    l_bytes, l_shape = encode_latent(loser_latent)
    if w_shape != l_shape:
        raise ValueError(f"prompt {pair.record.id!r}: winner latent {w_shape} and loser latent {l_shape} differ")
    example = {
        "pair_kind": pair.kind.encode(),
        "prompt_id": pair.record.id.encode(),
        "category": pair.record.category.encode(),
        "prompt": pair.prompt.encode(),
        "prompt_2": pair.prompt_2.encode(),
        "winner_latent": w_bytes,
        "loser_latent": l_bytes,
        "latent_shape": np.asarray(w_shape, np.int64),
        "winner_png": winner_png,
        "loser_png": loser_png,
        "winner_candidate": pair.winner.candidate,
        "loser_candidate": pair.loser.candidate,
        "winner_total": pair.winner.total,
        "loser_total": pair.loser.total,
        "scores_json": json.dumps({"winner": pair.winner.to_dict(), "loser": pair.loser.to_dict()},
                                  sort_keys=True).encode(),
    }
    if set(example) != set(PAIR_FEATURES):
        raise AssertionError(f"pair_example keys drifted from PAIR_FEATURES: {set(example) ^ set(PAIR_FEATURES)}")
    return example


def write_tfrecord(path: str | Path, serialized: Iterable[bytes]) -> int:
    """Writes records to `path` atomically (temp file, fsync, rename); returns the count."""
    tf = tensorflow_cpu_only()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name must not match the TFDS shard pattern, or metadata could count a torn file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")
    os.close(fd)
    count = 0
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in serialized:
                writer.write(record)
                count += 1
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
