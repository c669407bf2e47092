"""The held-out split of the pair dataset: made once, recorded in WORKDIR/train, never trained on.

    split = load_or_make_split(config.train, pairs_dir, train_dir, resuming=latest is not None)
    train_pairs = PairDataset(..., records=split.train)      # None: no split, every record
    val_pairs = PairDataset(..., records=split.held_out)

A prompt id is held out when the hash of the id, as a number in [0, 1), is below
`train.val_fraction`; or, with `train.val_pairs = n`, prompt ids are taken in hash order until at
least n pairs are held out. Either way the decision depends only on the ids: all pairs of a
prompt land on the same side, and the split of a dataset is the same on every machine and run.
The first start writes WORKDIR/train/val_split.json (the settings, the dataset's shard lengths,
the held-out positions and prompt ids); every later start reads that file instead of
re-scanning and refuses to continue if the config or the dataset no longer match it. A run that
started without a split cannot acquire one (its first steps may have trained on any pair), and
a recorded split stays in force even when validation is switched off, so a resumed run never
trains on held-out pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
from jax.experimental import multihost_utils

from agfsync_jax import atomic_io, storage
from agfsync_jax.errors import ConfigError
from agfsync_jax.pairs.dataset import RecordPosition, read_prompt_ids, record_positions

SPLIT_FILE = "val_split.json"
_SALT = "agfsync-val-split"


def split_key(prompt_id: str) -> float:
    """A prompt id's place in [0, 1): a stable hash, the same on every machine and run."""
    digest = hashlib.blake2b(f"{_SALT}\x1f{prompt_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def held_out_ids(prompt_ids: list[str], fraction: float, num_pairs: int) -> set[str]:
    """The held-out prompt ids (module docstring); `prompt_ids` has one entry per pair."""
    if fraction > 0:
        return {p for p in set(prompt_ids) if split_key(p) < fraction}
    counts: dict[str, int] = {}
    for p in prompt_ids:
        counts[p] = counts.get(p, 0) + 1
    chosen, total = set(), 0
    for p in sorted(counts, key=lambda p: (split_key(p), p)):
        if total >= num_pairs:
            break
        chosen.add(p)
        total += counts[p]
    return chosen


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[RecordPosition]
    held_out: list[RecordPosition]
    held_out_prompt_ids: list[str]


def _settings(train_cfg: Any) -> dict[str, Any]:
    return {"val_fraction": float(train_cfg.val_fraction), "val_pairs": int(train_cfg.val_pairs)}


def check_settings(train_cfg: Any) -> bool:
    """Whether a split is configured; a bad combination raises naming the fields."""
    fraction, pairs = float(train_cfg.val_fraction), int(train_cfg.val_pairs)
    if not 0.0 <= fraction < 1.0 or pairs < 0:
        raise ConfigError(f"train.val_fraction={fraction} must be in [0, 1) and train.val_pairs={pairs} >= 0")
    if fraction > 0 and pairs > 0:
        raise ConfigError("set train.val_fraction or train.val_pairs, not both")
    return fraction > 0 or pairs > 0


def _dataset_shape(pairs_dir: storage.Path) -> dict[str, Any]:
    info = json.loads((pairs_dir / "dataset_info.json").read_text())
    return {"splits": [{"name": s.get("name"), "shardLengths": s.get("shardLengths")} for s in info.get("splits", [])]}


def make_split(train_cfg: Any, pairs_dir: storage.Path) -> dict[str, Any]:
    """Scans the dataset's prompt ids and returns the record to write (see module docstring)."""
    records = read_prompt_ids(pairs_dir)
    ids = held_out_ids([p for _, p in records], float(train_cfg.val_fraction), int(train_cfg.val_pairs))
    held_out = [(pos, p) for pos, p in records if p in ids]
    if not held_out or len(held_out) == len(records):
        raise ConfigError(f"train.val_fraction={train_cfg.val_fraction} / train.val_pairs={train_cfg.val_pairs} "
                         f"holds out {len(held_out)} of the {len(records)} pairs in {pairs_dir}; choose a split that "
                         "leaves pairs on both sides")
    return {"settings": _settings(train_cfg), "dataset": _dataset_shape(pairs_dir), "num_records": len(records),
            "held_out": [[name, i] for (name, i), _ in held_out],
            "held_out_prompt_ids": sorted(ids)}


def _from_record(record: dict[str, Any], pairs_dir: storage.Path) -> Split:
    held = [(str(name), int(i)) for name, i in record["held_out"]]
    held_set = set(held)
    train = [pos for pos in record_positions(pairs_dir) if pos not in held_set]
    return Split(train=train, held_out=held, held_out_prompt_ids=list(record["held_out_prompt_ids"]))


def load_or_make_split(train_cfg: Any, pairs_dir: storage.PathLike, train_dir: storage.PathLike, *,
                       resuming: bool) -> Split | None:
    """The run's split, or None when there is none. Every process calls this: process 0 writes
    the split on a first start, then all read the recorded file."""
    pairs_dir, path = storage.as_path(pairs_dir), storage.as_path(train_dir) / SPLIT_FILE
    wanted = check_settings(train_cfg)
    if wanted and resuming and not path.is_file():
        raise ConfigError(f"train.val_fraction / train.val_pairs are set but this run started without a held-out "
                         f"split (no {path}): its checkpoints may have trained on any pair. Unset them, or start "
                         "in a new work directory")
    if wanted and not path.is_file():
        # Every process makes it (deterministic, from the records): a split that cannot be made
        # fails on all of them, rather than leaving the others waiting at the barrier below.
        split = make_split(train_cfg, pairs_dir)
        if jax.process_index() == 0:
            atomic_io.atomic_write_json(path, split)
    multihost_utils.sync_global_devices("agfsync:val_split")
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if wanted and record["settings"] != _settings(train_cfg):
        raise ConfigError(f"{path}: this run holds out pairs by {record['settings']}, the config says "
                         f"{_settings(train_cfg)}; the split of a run cannot change (use a new work directory)")
    if record["dataset"] != _dataset_shape(pairs_dir):
        raise ConfigError(f"{path}: recorded for a pair dataset with shards {record['dataset']}, but {pairs_dir} "
                         f"now has {_dataset_shape(pairs_dir)}; the held-out positions would be wrong")
    return _from_record(record, pairs_dir)
