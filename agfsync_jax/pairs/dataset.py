"""The training input pipeline: the preference-pair dataset (WORKDIR/pairs) as numpy batches.

    ds = PairDataset(pairs_dir, global_batch_size=128, seed=config.train.shuffle_seed)
    batch = next(ds)            # {"winner_latent": (B, C, H, W) float32, "prompt": (B,) str, ...}
    state = ds.state()          # small JSON-able dict; save it with the checkpoint
    ds.restore(state)           # the next batch is the one after the saved position

Each process reads only its slice: a contiguous block of about N / process_count records
(TFRecord files that do not overlap the block are never opened), so a process's batch is its
part of the global batch, ready for `jax.make_array_from_process_local_data`. Every epoch
visits the slice in a fresh order drawn from (seed, epoch, process_index); the last
(N // process_count) % per_process_batch records of an epoch's order are dropped so that every
process yields the same number of batches. The position is (epoch, batches consumed in the
epoch); since the order is a pure function of the seed, restoring is exact and costs nothing.

`records=` restricts the dataset to a subset, given as (file name, index in file) positions:
training passes every record but the held-out ones, validation only the held-out ones, and
reads those in a fixed order with `fixed_batches()`.

Records are read by byte offset: a header-only scan of each file in the slice finds the offsets
(and a truncated file), and the record reader (`agfsync_jax.storage.tfrecord`, local or gs://)
checks both CRCs of every record it returns. Any damage raises `PairDataError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from agfsync_jax.pairs.records import (PairDataError, decode_latent, decode_pair_example, scan_record_offsets)
from agfsync_jax import storage
from agfsync_jax.schemas import PAIR_CROSS, PAIR_SFT
from agfsync_jax.storage import Path, PathLike, tfrecord
from agfsync_jax.tf_cpu import tensorflow_cpu_only

# String fields of a batch (numpy object arrays; tokenization happens elsewhere).
TEXT_FIELDS = ("prompt_id", "pair_kind", "prompt", "prompt_2")


def _split_files(data_dir: Path, split: str) -> list[tuple[Path, int]]:
    """(file, number of records) of a split, in order, from the TFDS metadata."""
    tensorflow_cpu_only()
    import tensorflow_datasets as tfds

    if not (data_dir / "dataset_info.json").is_file():
        raise PairDataError(f"{data_dir}: no dataset_info.json; is the scoring stage finished?")
    info = tfds.builder_from_directory(str(data_dir)).info
    if split not in info.splits:
        raise PairDataError(f"{data_dir}: no split {split!r} (have {list(info.splits)})")
    s = info.splits[split]
    return [(data_dir / name, int(n)) for name, n in zip(s.filenames, s.shard_lengths)]


# A record's address in the dataset: (TFRecord file name, index of the record in that file).
RecordPosition = tuple[str, int]


def record_positions(data_dir: PathLike, split: str = "train") -> list[RecordPosition]:
    """Every record's position, in dataset order, from the TFDS metadata alone."""
    return [(path.name, i) for path, n in _split_files(storage.as_path(data_dir), split) for i in range(n)]


def read_prompt_ids(data_dir: PathLike, split: str = "train") -> list[tuple[RecordPosition, str]]:
    """(position, prompt id) of every record of the split, in dataset order (reads every record)."""
    out = []
    for path, n in _split_files(storage.as_path(data_dir), split):
        if not n:
            continue
        offsets = scan_record_offsets(path)
        if len(offsets) != n:
            raise PairDataError(f"{path}: holds {len(offsets)} records but dataset_info.json says {n}")
        reader = tfrecord.RecordReader(path)
        try:
            for i, offset in enumerate(offsets):
                where = f"{path} record {i} (byte {offset})"
                try:
                    serialized = reader.read(offset)
                except (tfrecord.RecordFileError, OSError) as e:
                    raise PairDataError(f"{where}: unreadable ({e})") from e
                out.append(((path.name, i), decode_pair_example(serialized, where)["prompt_id"].decode("utf-8")))
        finally:
            reader.close()
    return out


class PairDataset:
    """An endless iterator of per-process numpy batches of preference pairs (see module doc)."""

    def __init__(self, data_dir: PathLike, global_batch_size: int, seed: int, *, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None,
                 records: Sequence[RecordPosition] | None = None):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of "
                             f"the process count {process_count}")
        self.data_dir, self.split, self.seed = storage.as_path(data_dir), split, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // process_count

        files = _split_files(self.data_dir, split)
        if records is None:
            chosen = [(path, i) for path, n in files for i in range(n)]
        else:
            lengths = {path.name: (path, n) for path, n in files}
            chosen = []
            for name, i in records:
                if name not in lengths or not 0 <= i < lengths[name][1]:
                    raise PairDataError(f"{self.data_dir}: no record {i} in file {name!r} (a held-out split "
                                        "recorded for another pair dataset?)")
                chosen.append((lengths[name][0], int(i)))
        self.num_records = len(chosen)
        lo = process_index * self.num_records // process_count
        hi = (process_index + 1) * self.num_records // process_count
        # (file, byte offset, index in file) of every record of this process's slice, in order.
        self._records: list[tuple[Path, int, int]] = []
        offsets_of: dict[Path, list[int]] = {}
        expected = dict(files)
        for path, i in chosen[lo:hi]:
            if path not in offsets_of:
                offsets_of[path] = scan_record_offsets(path)
                if len(offsets_of[path]) != expected[path]:
                    raise PairDataError(f"{path}: holds {len(offsets_of[path])} records but dataset_info.json "
                                        f"says {expected[path]}")
            self._records.append((path, offsets_of[path][i], i))
        self.batches_per_epoch = (self.num_records // process_count) // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.data_dir}: {self.num_records} pairs over {process_count} processes do not "
                             f"fill one batch of {self.batch_size} per process")
        self._readers: dict[Path, Any] = {}
        self._epoch, self._batch = 0, 0
        self._order: np.ndarray | None = None

    @property
    def slice_files(self) -> list[Path]:
        """The TFRecord files this process reads (those overlapping its slice)."""
        return sorted({path for path, _, _ in self._records})

    @property
    def slice_size(self) -> int:
        return len(self._records)

    # --- position -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The position as a JSON-able dict (the same on every process)."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed, "split": self.split,
                "num_records": self.num_records, "process_count": self.process_count,
                "global_batch_size": self.global_batch_size}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue after the position `state` (from `state()`, possibly through JSON)."""
        for key in ("seed", "split", "num_records", "process_count", "global_batch_size"):
            if key not in state:
                raise ValueError(f"data iterator state lacks {key!r}: {json.dumps(state)}")
            if state[key] != getattr(self, key):
                raise ValueError(f"data iterator state has {key}={state[key]!r} but this pipeline has "
                                 f"{getattr(self, key)!r}; resuming would not continue the same sequence")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"data iterator state has epoch {epoch}, batch {batch} "
                             f"(an epoch has {self.batches_per_epoch} batches)")
        self._epoch, self._batch, self._order = epoch, batch, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into this process's slice, in the order epoch `epoch` visits them."""
        rng = np.random.default_rng([self.seed, epoch, self.process_index])
        return rng.permutation(len(self._records))[: self.batches_per_epoch * self.batch_size]

    # --- reading --------------------------------------------------------------------------------
    def _read(self, local_index: int) -> tuple[dict[str, Any], str]:
        path, offset, index_in_file = self._records[local_index]
        where = f"{path} record {index_in_file} (byte {offset})"
        reader = self._readers.get(path)
        if reader is None:
            reader = self._readers[path] = tfrecord.RecordReader(path)
        try:
            serialized = reader.read(offset)
        except (tfrecord.RecordFileError, OSError) as e:
            raise PairDataError(f"{where}: unreadable ({e})") from e
        return decode_pair_example(serialized, where), where

    def __iter__(self) -> "PairDataset":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch, self._order = self._epoch + 1, 0, None
        if self._order is None:
            self._order = self.epoch_order(self._epoch)
        chunk = self._order[self._batch * self.batch_size:(self._batch + 1) * self.batch_size]
        batch = self._make_batch([int(i) for i in chunk])
        self._batch += 1
        return batch

    def fixed_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over this process's slice in slice order, unshuffled, without touching the
        position (validation); the same batches on every call."""
        for b in range(self.batches_per_epoch):
            yield self._make_batch(list(range(b * self.batch_size, (b + 1) * self.batch_size)))

    def _make_batch(self, local_indices: list[int]) -> dict[str, np.ndarray]:
        winners, losers = [], []
        columns: dict[str, list[Any]] = {k: [] for k in (*TEXT_FIELDS, "winner_total", "loser_total")}
        shape0, where0 = None, ""
        for i in local_indices:
            rec, where = self._read(i)
            shape = tuple(rec["latent_shape"])
            if shape0 is None:
                shape0, where0 = shape, where
            elif shape != shape0:
                raise PairDataError(f"{where}: latent shape {shape} differs from {shape0} of {where0}")
            winners.append(decode_latent(rec["winner_latent"], shape, where))
            losers.append(decode_latent(rec["loser_latent"], shape, where))
            for k in TEXT_FIELDS:
                columns[k].append(rec[k].decode("utf-8"))
            columns["winner_total"].append(rec["winner_total"])
            columns["loser_total"].append(rec["loser_total"])
        batch: dict[str, np.ndarray] = {
            "winner_latent": np.stack(winners).astype(np.float32),
            "loser_latent": np.stack(losers).astype(np.float32),
            "winner_total": np.asarray(columns["winner_total"], np.float32),
            "loser_total": np.asarray(columns["loser_total"], np.float32),
        }
        for k in TEXT_FIELDS:
            arr = np.empty(len(local_indices), dtype=object)
            arr[:] = columns[k]
            batch[k] = arr
        batch["is_cross"] = np.array([k == PAIR_CROSS for k in columns["pair_kind"]], dtype=np.bool_)
        batch["is_sft"] = np.array([k == PAIR_SFT for k in columns["pair_kind"]], dtype=np.bool_)
        return batch
