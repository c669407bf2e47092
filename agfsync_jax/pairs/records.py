"""The pair dataset's record format: TFRecord shards of tf.train.Example pairs (WORKDIR/pairs).

Writers (the score stage, the encode stage) build a feature dict with `pair_features` and write
shards with `write_tfrecord`; the training reader (`agfsync_jax.pairs.dataset`) decodes them with
`decode_pair_example`. Both sides are built from schemas.PAIR_FEATURES, and examples are
serialized by TFDS's own serializer, so `tfds.builder_from_directory` decodes what we write.
Shards are framed by `agfsync_jax.storage.tfrecord` (byte for byte what tf.io.TFRecordWriter
writes), so they can be written to and read from gs:// too.
Latents are stored as float16 bytes (C-order) plus their shape: half the size of float32, and SD
latents (|x| < ~10) lose nothing that matters for DPO at float16's 11-bit precision.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.storage import PathLike, tfrecord
from agfsync_jax.schemas import LATENT_DTYPE, PAIR_FEATURES
from agfsync_jax.tf_cpu import tensorflow_cpu_only

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


def pair_features(*, pair_kind: str, prompt_id: str, category: str, prompt: str, prompt_2: str,
                  winner_latent: np.ndarray, loser_latent: np.ndarray, winner_png: bytes = b"",
                  loser_png: bytes = b"", winner_candidate: int, loser_candidate: int, winner_total: float,
                  loser_total: float, scores_json: str) -> dict[str, Any]:
    """The feature dict of one pair record; keys are exactly PAIR_FEATURES."""
    w_bytes, w_shape = encode_latent(winner_latent)
    l_bytes, l_shape = encode_latent(loser_latent)
    if w_shape != l_shape:
        raise ValueError(f"prompt {prompt_id!r}: winner latent {w_shape} and loser latent {l_shape} differ")
    example = {
        "pair_kind": pair_kind.encode(), "prompt_id": prompt_id.encode(), "category": category.encode(),
        "prompt": prompt.encode(), "prompt_2": prompt_2.encode(), "winner_latent": w_bytes,
        "loser_latent": l_bytes, "latent_shape": np.asarray(w_shape, np.int64), "winner_png": winner_png,
        "loser_png": loser_png, "winner_candidate": int(winner_candidate), "loser_candidate": int(loser_candidate),
        "winner_total": float(winner_total), "loser_total": float(loser_total), "scores_json": scores_json.encode(),
    }
    if set(example) != set(PAIR_FEATURES):
        raise AssertionError(f"pair_features keys drifted from PAIR_FEATURES: {set(example) ^ set(PAIR_FEATURES)}")
    return example


def write_tfrecord(path: PathLike, serialized: Iterable[bytes]) -> int:
    """Writes records to `path` atomically (local: temp file, fsync, rename; gs://: one upload);
    returns the count. The local temp name (".<name>.*.tmp") matches no TFDS shard pattern."""
    return tfrecord.write_records(path, serialized)


class PairDataError(IOError):
    """The pair dataset is damaged or inconsistent; the message names the file."""


def decode_pair_example(serialized: bytes, where: str) -> dict[str, Any]:
    """A serialized tf.train.Example -> {field: value} for every field of PAIR_FEATURES.

    bytes -> bytes, int -> int, float -> float, int_list -> tuple of ints. A missing or
    mistyped field raises PairDataError naming `where` (file and record).
    """
    from google.protobuf.message import DecodeError

    tf = tensorflow_cpu_only()
    try:
        example = tf.train.Example.FromString(serialized)
    except DecodeError as e:
        raise PairDataError(f"{where}: not a tf.train.Example ({e})") from e
    features = example.features.feature
    out: dict[str, Any] = {}
    for name, kind in PAIR_FEATURES.items():
        if name not in features:
            raise PairDataError(f"{where}: missing feature {name!r}")
        f = features[name]
        if kind == "bytes":
            values = f.bytes_list.value
        elif kind in ("int", "int_list"):
            values = f.int64_list.value
        elif kind == "float":
            values = f.float_list.value
        else:
            raise ValueError(f"PAIR_FEATURES[{name!r}] has unknown kind {kind!r}")
        if kind == "int_list":
            out[name] = tuple(int(v) for v in values)
            continue
        if len(values) != 1:
            raise PairDataError(f"{where}: feature {name!r} ({kind}) has {len(values)} values, expected 1")
        out[name] = values[0]
    return out


def decode_latent(data: bytes, shape: tuple[int, ...], where: str) -> np.ndarray:
    """float16 bytes + shape -> the float16 array (a copy, writable)."""
    expected = int(np.prod(shape)) * np.dtype(LATENT_DTYPE).itemsize
    if len(shape) != 3 or len(data) != expected:
        raise PairDataError(f"{where}: latent of {len(data)} bytes does not match shape {shape} "
                            f"({expected} bytes of {LATENT_DTYPE})")
    return np.frombuffer(data, dtype=LATENT_DTYPE).reshape(shape).copy()


def scan_record_offsets(path: PathLike) -> list[int]:
    """Byte offsets of the records of a TFRecord file, from the length headers alone.

    A file that ends inside a record (a truncated copy, a writer killed mid-write) raises
    PairDataError naming the file, the record and the byte position.
    """
    try:
        return tfrecord.scan_record_offsets(path)
    except tfrecord.RecordFileError as e:
        raise PairDataError(str(e)) from e
