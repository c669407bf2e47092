"""Stage `encode`: an external image dataset -> WORKDIR/pairs through the VAE encoder.

    agfsync-jax encode --config=configs/sd15.py --workdir=DIR \
        --config.encode.format=folder --config.encode.path=/data/mjhq30k --config.encode.category_key=category
    agfsync-jax train --config=configs/sd15.py --workdir=DIR --config.train.loss=sft

The output is the pair dataset the scoring stage writes (TFRecord shards + TFDS metadata, see
records.py for how external rows fill it), so `train` reads it unchanged. Rows are cut into
shards of `encode.rows_per_shard` consecutive rows; shard j belongs to stage shard x process
j % (shard.count x process_count), and each JAX process encodes the shards it owns, reading only
their rows. A shard is written atomically (TFRecord, then its summary); a re-run skips shards
whose summary exists and whose file holds the records it says. Rows without a prompt or an
image, with an image that does not decode, or with a tied label are skipped and counted with
the reason. Once every shard is done, the TFDS metadata and the done marker are written.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from agfsync_jax import atomic_io, base_model, done_marker, fingerprint, sharding, storage, workdir as workdir_lib
from agfsync_jax.encoding import preprocess, records
from agfsync_jax.encoding.program import EncodingProgram, check_batch_layout
from agfsync_jax.encoding.source_rows import (
    SKIP_MISSING_IMAGE, SKIP_MISSING_PROMPT, SKIP_TIE, SKIP_UNREADABLE_IMAGE, ImageSource, SourceRow)
from agfsync_jax.encoding.source_spec import SourceSpec
from agfsync_jax.encoding.sources import open_source
from agfsync_jax.encoding.vae_encoder import LATENT_MODES
from agfsync_jax.errors import ConfigError, StageChangedError
from agfsync_jax.models.dtype_policy import DtypePolicy
from agfsync_jax.base_model import resolve_base_model_on_every_process
from agfsync_jax.models.loading import load_stable_diffusion
from agfsync_jax.pairs.records import PairDataError, scan_record_offsets
from agfsync_jax.sampling import candidate_seeds, outputs
from agfsync_jax.pairs.metadata import write_tfds_metadata
from agfsync_jax.pairs.records import shard_filename, tfds_features, write_tfrecord

SETTINGS_FILE = "encode_settings.json"
SUMMARY_PREFIX = "encode-summary-"
# Rows decoded and resized at a time, on _DECODE_THREADS threads (PIL releases the GIL there).
_DECODE_CHUNK = 64
_DECODE_THREADS = 4
# Skipped rows listed by position in a shard's summary (all are counted).
_LISTED_SKIPS = 100


# Fields that change how fast records are made, not what they hold.
IGNORED = ("encode.batch_size",) + base_model.COVERED_BY_IDENTITY


def _settings(config: Any, spec: SourceSpec, num_rows: int, workdir: storage.Path) -> dict[str, Any]:
    """Everything that determines the records: the encode and model fields (all but IGNORED),
    the source's identity and size, and the base model's identity."""
    return {**fingerprint.config_settings(config, ("model", "encode"), IGNORED),
            **base_model.model_identity(config), "source.path": str(Path(spec.path).resolve()),
            "source.identity": _source_identity(spec, workdir), "source.rows": num_rows}


def _source_identity(spec: SourceSpec, workdir: storage.Path) -> str:
    """Names and sizes (metadata: contents) of the files the source reads; for a folder, only its
    images, captions and metadata files, so that other files kept there do not count."""
    path = Path(spec.path)
    if spec.format != "folder" or not path.is_dir():
        return base_model.folder_identity(path, exclude=workdir)
    from agfsync_jax.encoding.folder_source import IMAGE_EXTENSIONS

    h = hashlib.sha256()
    # The source is local: a gs:// work directory cannot be inside it.
    skip = None if storage.is_remote(workdir) else Path(workdir).resolve()
    for p in sorted(path.rglob("*")):
        if not p.is_file() or (skip is not None and p.resolve().is_relative_to(skip)):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS + (".txt",):
            h.update(f"{p.relative_to(path)}:{p.stat().st_size}\0".encode())
        elif p.suffix in (".json", ".jsonl") and p.parent == path:
            h.update(f"{p.name}:".encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _summary_path(pairs_dir: storage.Path, suffix: str) -> Path:
    return pairs_dir / f"{SUMMARY_PREFIX}{suffix}.json"


def _check_pairs_dir(pairs_dir: storage.Path) -> None:
    """WORKDIR/pairs must be empty or ours: the scoring stage writes the same shard names."""
    if not pairs_dir.is_dir():
        return
    if (any(pairs_dir.glob("summary-*.json")) or
            (any(pairs_dir.iterdir()) and not (pairs_dir / SETTINGS_FILE).is_file())):
        raise FileExistsError(f"{pairs_dir} holds pairs that the encode stage did not write (the scoring stage's?); "
                              "encode an external dataset into a fresh work directory")


@dataclasses.dataclass
class _Shard:
    """A shard being encoded: its rows' latents arrive batch by batch."""

    index: int
    rows: list[SourceRow] = dataclasses.field(default_factory=list)
    latents: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)
    pngs: dict[tuple[int, int], bytes] = dataclasses.field(default_factory=dict)
    images: int = 0  # images handed to the encoder
    skipped: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (row, where, reason)
    listed: bool = False  # every row has been read

    @property
    def complete(self) -> bool:
        return self.listed and len(self.latents) == self.images


@dataclasses.dataclass(frozen=True)
class _Image:
    shard: int
    row: int
    slot: int
    pixels: np.ndarray  # (H, W, 3) uint8
    key_data: np.ndarray  # (2,) uint32


def _prepare(row: SourceRow, resolution: int) -> tuple[str | None, list[np.ndarray], str]:
    """(skip reason or None, the row's images as uint8, detail for the log)."""
    if row.prompt is None:
        return SKIP_MISSING_PROMPT, [], ""
    if any(ref is None for ref in row.images):
        return SKIP_MISSING_IMAGE, [], ""
    if row.label == 0.5:
        return SKIP_TIE, [], ""
    images = []
    for ref in row.images:
        try:
            images.append(preprocess.to_uint8(ref.read(), resolution, ref.where))
        except (OSError, preprocess.ImageDecodeError) as e:
            return SKIP_UNREADABLE_IMAGE, [], str(e)
    return None, images, ""


def image_key_data(seed: int, row_index: int, slot: int) -> np.ndarray:
    """The posterior-sample key of image `slot` of row `row_index`: a function of what the image
    is, never of the batch or process that encodes it."""
    return candidate_seeds.key_data(candidate_seeds.stream_seed(seed, f"vae_posterior/{row_index}/{slot}"))


class _Encoder:
    """Reads this process's shards, feeds the program fixed-size batches, writes finished shards."""

    def __init__(self, config: Any, source: ImageSource, pairs_dir: storage.Path, num_rows: int, shard_count: int):
        self.config = config
        self.source = source
        self.pairs_dir = pairs_dir
        self.num_rows = num_rows
        self.shard_count = shard_count
        self.rows_per_shard = int(config.encode.rows_per_shard)
        self.resolution = int(config.model.resolution)
        self.shards: dict[int, _Shard] = {}
        self.written: list[dict[str, Any]] = []

    def images(self, todo: list[int], progress: tqdm) -> Iterator[_Image]:
        seed = int(self.config.encode.seed)
        with ThreadPoolExecutor(_DECODE_THREADS) as pool:
            for j in todo:
                shard = self.shards[j] = _Shard(j)
                start = j * self.rows_per_shard
                rows = list(self.source.rows(start, min(start + self.rows_per_shard, self.num_rows)))
                for c in range(0, len(rows), _DECODE_CHUNK):
                    chunk = rows[c:c + _DECODE_CHUNK]
                    for row, (reason, images, detail) in zip(
                            chunk, pool.map(lambda r: _prepare(r, self.resolution), chunk)):
                        progress.update(1)
                        if reason is not None:
                            shard.skipped.append((row.index, row.where, reason))
                            logging.warning("encode: skipping %s: %s%s", row.where, reason,
                                            f" ({detail})" if detail else "")
                            continue
                        shard.rows.append(row)
                        shard.images += len(images)
                        for slot, pixels in enumerate(images):
                            yield _Image(j, row.index, slot, pixels, image_key_data(seed, row.index, slot))
                shard.listed = True
                self.flush()  # a shard whose rows were all skipped is complete now

    def collect(self, group: list[_Image], latents: np.ndarray) -> None:
        store_png = bool(self.config.encode.store_png)
        for image, latent in zip(group, latents):
            shard = self.shards[image.shard]
            if not np.isfinite(latent).all():
                raise FloatingPointError(f"encode: non-finite latent for row {image.row} image {image.slot} "
                                         f"(shard {image.shard}); check model.compute_dtype and the VAE weights")
            shard.latents[(image.row, image.slot)] = latent
            shard.pngs[(image.row, image.slot)] = outputs.encode_png(image.pixels) if store_png else b""
        self.flush()

    def flush(self) -> None:
        for j in [j for j, s in self.shards.items() if s.complete]:
            self._write(self.shards.pop(j))

    def _write(self, shard: _Shard) -> None:
        features = tfds_features()
        source = str(self.source.path)
        examples = []
        for row in shard.rows:
            slots = range(len(row.images))
            examples.append(records.external_example(
                row, tuple(shard.latents[(row.index, s)] for s in slots),
                tuple(shard.pngs[(row.index, s)] for s in slots), source))
        kinds = collections.Counter(e["pair_kind"].decode() for e in examples)
        count = write_tfrecord(self.pairs_dir / shard_filename(shard.index, self.shard_count),
                               (features.serialize_example(e) for e in examples))
        start = shard.index * self.rows_per_shard
        summary = {
            "shard": shard.index, "rows": min(self.rows_per_shard, self.num_rows - start), "records": count,
            "pairs_by_kind": dict(kinds),
            "skipped": dict(collections.Counter(reason for _, _, reason in shard.skipped)),
            "skipped_rows": [{"row": i, "where": w, "reason": r} for i, w, r in shard.skipped[:_LISTED_SKIPS]],
        }
        atomic_io.atomic_write_json(
            _summary_path(self.pairs_dir, workdir_lib.shard_suffix(shard.index, self.shard_count)), summary)
        self.written.append(summary)


def _shard_done(pairs_dir: storage.Path, j: int, shard_count: int) -> bool:
    suffix = workdir_lib.shard_suffix(j, shard_count)
    summary_path, shard_path = _summary_path(pairs_dir, suffix), pairs_dir / shard_filename(j, shard_count)
    if not summary_path.is_file() or not shard_path.is_file():
        return False
    try:
        ok = len(scan_record_offsets(shard_path)) == json.loads(summary_path.read_text())["records"]
    except (PairDataError, json.JSONDecodeError, KeyError) as e:
        logging.warning("encode: re-encoding shard %d: %s", j, e)
        return False
    if not ok:
        logging.warning("encode: re-encoding shard %d: %s holds another number of records than its summary",
                        j, shard_path)
    return ok


def _global_max(value: int) -> int:
    """The maximum over processes: every process must run the program equally often."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _finish(pairs_dir: storage.Path, shard_count: int, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Metadata and the done marker, once every shard of every process is done; else None."""
    done_path = pairs_dir / workdir_lib.DONE_MARKER
    if done_path.is_file():  # removed by any run that had work left
        return json.loads(done_path.read_text())
    summaries = []
    for j in range(shard_count):
        if not _shard_done(pairs_dir, j, shard_count):
            return None
        summaries.append(json.loads(_summary_path(pairs_dir, workdir_lib.shard_suffix(j, shard_count)).read_text()))
    num_records = write_tfds_metadata(pairs_dir, shard_count)
    if num_records != sum(s["records"] for s in summaries):
        raise RuntimeError(f"{pairs_dir}: TFRecords hold {num_records} records but the shard summaries say "
                           f"{sum(s['records'] for s in summaries)}")
    total = lambda key: dict(sum((collections.Counter(s[key]) for s in summaries), collections.Counter()))  # noqa: E731
    done = {"pairs": num_records, "shards": shard_count, "rows": settings["source.rows"],
            "pairs_by_kind": total("pairs_by_kind"), "skipped": total("skipped"), "source": settings["source.path"]}
    done_marker.write(pairs_dir, done, settings)
    return done


def _settings_check(pairs_dir: storage.Path, settings: dict[str, Any], write: bool) -> None:
    path = pairs_dir / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = fingerprint.changed_fields(before, settings)
        if changed:
            raise StageChangedError(
                f"{path}: these pairs were encoded with other settings ({', '.join(changed[:8])} changed); "
                f"{done_marker.redo_hint('encode', pairs_dir.parent)}")
    elif write:
        atomic_io.atomic_write_json(path, settings)


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Encodes every shard of this process that is not done yet; returns the summary."""
    from agfsync_jax import distributed

    distributed.initialize()  # under a multi-process launcher; a no-op for one process
    e = config.encode
    if e.latent not in LATENT_MODES:
        raise ConfigError(f"encode.latent={e.latent!r}, expected one of {LATENT_MODES}")
    if int(e.rows_per_shard) < 1 or int(e.limit) < 0:
        raise ConfigError(f"encode.rows_per_shard={e.rows_per_shard} must be >= 1 and encode.limit={e.limit} >= 0")
    is_lead = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    check_batch_layout(int(e.batch_size), mesh.devices.size, jax.process_count())
    spec = SourceSpec.from_config(e)
    pairs_dir = storage.as_path(workdir) / workdir_lib.PAIRS
    _check_pairs_dir(pairs_dir)
    source = open_source(spec)
    num_rows = len(source) if int(e.limit) == 0 else min(int(e.limit), len(source))
    if num_rows == 0:
        raise ValueError(f"{source.path}: no rows to encode")
    model_path = resolve_base_model_on_every_process(config, workdir)
    settings = _settings(config, spec, num_rows, storage.as_path(workdir))
    pairs_dir.mkdir(parents=True, exist_ok=True)
    _settings_check(pairs_dir, settings, write=is_lead)
    _sync("encode: settings")

    shard_count = math.ceil(num_rows / int(e.rows_per_shard))
    owners = int(config.shard.count) * jax.process_count()
    if not 0 <= int(config.shard.index) < int(config.shard.count):
        raise ConfigError(f"shard.index={config.shard.index} is not in [0, shard.count={config.shard.count})")
    me = int(config.shard.index) * jax.process_count() + jax.process_index()
    mine = [j for j in range(shard_count) if j % owners == me]
    todo = [j for j in mine if not _shard_done(pairs_dir, j, shard_count)]
    if todo:
        (pairs_dir / workdir_lib.DONE_MARKER).unlink(missing_ok=True)
    rows_per_shard = int(e.rows_per_shard)
    todo_rows = sum(min(rows_per_shard, num_rows - j * rows_per_shard) for j in todo)
    local_batch = int(e.batch_size) // jax.process_count()
    # An upper bound (skipped rows encode nothing); a process that runs out pads its calls.
    num_batches = _global_max(math.ceil(todo_rows * len(spec.image_keys) / local_batch))
    logging.info("encode: %d rows in %d shards; this process: %d shards, %d to encode (%d rows) in at most %d "
                 "batches", num_rows, shard_count, len(mine), len(todo), todo_rows, num_batches)

    encoder = _Encoder(config, source, pairs_dir, num_rows, shard_count)
    program = None
    if num_batches:
        sd = load_stable_diffusion(model_path, DtypePolicy.from_config(config.model), components=("unet", "vae"),
                                   variant=config.model.variant)
        # VAE parameters are laid out as for sampling (sampling.shard_params).
        program = EncodingProgram(sd.vae, mesh, batch_size=int(e.batch_size), resolution=int(config.model.resolution),
                                  mode=e.latent, param_mode=config.sampling.shard_params,
                                  min_shard_size=int(config.mesh.min_shard_size))
        _encode(program, encoder, todo, num_batches, todo_rows, is_lead)

    _sync("encode: all shards written")
    done = _finish(pairs_dir, shard_count, settings) if is_lead else None
    skipped = collections.Counter()
    for s in encoder.written:
        skipped.update(s["skipped"])
    summary = {"rows": num_rows, "shards": shard_count, "shards_mine": len(mine),
               "shards_encoded": len(encoder.written), "shards_skipped_done": len(mine) - len(todo),
               "records": sum(s["records"] for s in encoder.written), "skipped": dict(skipped),
               "complete": done is not None if is_lead else None}
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "none"
    print(f"encode: {summary['records']} records written in {len(encoder.written)} shards, "
          f"{summary['shards_skipped_done']} shards skipped (done), rows skipped: {reasons}"
          + (f"; dataset complete: {done['pairs']} records {done['pairs_by_kind']} -> {pairs_dir}" if done else ""),
          flush=True)
    return summary


def _encode(program: EncodingProgram, encoder: _Encoder, todo: list[int], num_batches: int, todo_rows: int,
            is_lead: bool) -> None:
    """Exactly `num_batches` calls of the program; the device encodes a batch while the host reads
    and resizes the next one."""
    n = program.local_batch_size
    res = program.resolution
    pending: tuple[list[_Image], Any] | None = None
    with tqdm(total=todo_rows, desc="encode", unit="row", disable=not is_lead) as progress:
        images = encoder.images(todo, progress)
        for _ in range(num_batches):
            group = [image for _, image in zip(range(n), images)]
            pixels = np.zeros((n, 3, res, res), np.float32)
            keys = np.zeros((n, 2), np.uint32)
            for i, image in enumerate(group):
                pixels[i] = preprocess.normalize(image.pixels)
                keys[i] = image.key_data
            out = program(pixels, keys)
            if pending is not None:
                encoder.collect(pending[0], program.local_rows(pending[1])[:len(pending[0])])
            pending = (group, out)
        if pending is not None:
            encoder.collect(pending[0], program.local_rows(pending[1])[:len(pending[0])])
        leftover = next(images, None)
        if leftover is not None:
            raise RuntimeError(f"encode: row {leftover.row} was not encoded: the batch count was too small")
    if encoder.shards:
        raise RuntimeError(f"encode: shards {sorted(encoder.shards)} were not completed")
