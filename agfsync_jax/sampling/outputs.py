"""The candidates directory: files, manifests, verification, and the settings that produced them.

    WORKDIR/candidates/
      <prompt dir>/i<instruction>-c<candidate>.png   the decoded image (optional)
      <prompt dir>/i<instruction>-c<candidate>.npy   float32 (C, h, w): the sampler's final latents
                                                     in UNet space; the image is the VAE decoding of
                                                     latent / vae.scaling_factor
      manifest-<shard>.jsonl                         one schemas.ManifestRow per candidate
      sampling_settings.json                         what every file here was sampled with
      _DONE.json                                     written last, when every prompt is complete

Files are written atomically (image, then latent) before their manifest row is appended, so a
row always points at complete files; on an object store the rows of a batch are uploaded after
its files (`storage.JsonlAppender`). A candidate counts as done only when its row exists and
its files verify (the PNG decodes to the expected size, the .npy has the expected shape, dtype
and finite values); anything else is regenerated.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from agfsync_jax import storage
from agfsync_jax.storage import Path
from agfsync_jax.sampling.work_plan import CandidateKey
from agfsync_jax.schemas import ManifestRow

SETTINGS_FILE = "sampling_settings.json"
MANIFEST_PREFIX = "manifest-"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def prompt_dir_name(prompt_id: str) -> str:
    """A file-system-safe directory name for a prompt id, unique per id."""
    safe = _SAFE.sub("_", prompt_id)[:80]
    if safe == prompt_id and safe not in (".", ".."):
        return safe
    # Sanitising can merge ids ("a/b" and "a_b"): a hash of the original keeps them apart.
    return f"{safe}-{hashlib.blake2b(prompt_id.encode('utf-8'), digest_size=4).hexdigest()}"


def relative_paths(key: CandidateKey) -> tuple[str, str]:
    """(image, latent) paths of a candidate, relative to the candidates directory."""
    prompt_id, instruction, candidate = key
    stem = f"{prompt_dir_name(prompt_id)}/i{instruction}-c{candidate:03d}"
    return f"{stem}.png", f"{stem}.npy"


def manifest_name(shard_suffix: str) -> str:
    return f"{MANIFEST_PREFIX}{shard_suffix}.jsonl"


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def write_candidate(out_dir: Path, row: ManifestRow, latent: np.ndarray, image: np.ndarray | None) -> None:
    """Writes a candidate's files atomically; its manifest row goes in afterwards."""
    if row.image:
        if image is None:
            raise ValueError(f"{row.prompt_id}: the row names an image but none was decoded")
        storage.write_bytes(out_dir / row.image, encode_png(image))
    storage.write_bytes(out_dir / row.latent, encode_npy(latent))


def verify_candidate(out_dir: Path, row: ManifestRow, latent_shape: tuple[int, ...],
                     image_size: int | None) -> str | None:
    """None when the candidate's files are complete and sound, else the reason they are not."""
    latent_path = out_dir / row.latent
    if not latent_path.is_file():
        return f"missing {row.latent}"
    try:
        latent = storage.read_npy(latent_path)
    except (OSError, ValueError, EOFError) as e:
        return f"unreadable {row.latent} ({e})"
    if latent.shape != tuple(latent_shape) or latent.dtype != np.float32:
        return f"{row.latent} is {latent.dtype}{list(latent.shape)}, expected float32{list(latent_shape)}"
    if not np.isfinite(latent).all():
        return f"{row.latent} has non-finite values"
    if image_size is None:
        return None
    if not row.image:
        return "no image recorded"
    from PIL import UnidentifiedImageError

    image_path = out_dir / row.image
    if not image_path.is_file():
        return f"missing {row.image}"
    try:
        im = storage.open_image(image_path)  # decodes every byte: a truncated or corrupted PNG fails here
        if im.size != (image_size, image_size) or im.mode != "RGB":
            return f"{row.image} is {im.mode} {im.size}, expected RGB {(image_size, image_size)}"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"undecodable {row.image} ({e})"
    return None


def remove_stale_temp_files(out_dir: Path, prompt_ids: Iterable[str]) -> int:
    """Deletes temp files a killed writer left in these prompts' directories (only this shard's:
    another process may be writing its own right now). Object stores have none."""
    if storage.is_remote(out_dir):
        return 0
    removed = 0
    for prompt_id in prompt_ids:
        for tmp in (out_dir / prompt_dir_name(prompt_id)).glob(".*.tmp"):
            storage.remove(tmp)
            removed += 1
    return removed


def manifest_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob(f"{MANIFEST_PREFIX}*.jsonl"))


def read_manifests(out_dir: Path) -> tuple[dict[CandidateKey, ManifestRow], int]:
    """Rows of every manifest shard, keyed by candidate (first row wins), and the duplicate count.

    A torn last line (a process killed while appending) is dropped; any other malformed line is
    corruption and raises, naming file and line.
    """
    rows: dict[CandidateKey, ManifestRow] = {}
    duplicates = 0
    for path in manifest_files(out_dir):
        for i, obj in enumerate(storage.read_complete_lines(path)):
            row = ManifestRow.from_dict(obj, f"{path} row {i + 1}")
            key = (row.prompt_id, row.instruction, row.candidate)
            if key in rows:
                duplicates += 1
            else:
                rows[key] = row
    return rows, duplicates


class ManifestWriter:
    """Appends rows to this process's manifest shard; repairs a torn tail left by a crash first."""

    def __init__(self, path: Path):
        self.path = path
        if not storage.is_remote(path):
            for tmp in path.parent.glob(f".{path.name}.*.tmp"):  # a repair killed half-way
                storage.remove(tmp)
        if storage.has_torn_tail(path):
            # Appending after a torn line would glue the new row onto it.
            storage.write_jsonl(path, storage.read_complete_lines(path))
        self._appender = storage.JsonlAppender(path)

    def append(self, row: ManifestRow) -> None:
        self._appender.append(row.to_dict())

    def flush(self) -> None:
        """Makes the rows appended so far durable (on an object store: uploads them)."""
        self._appender.flush()

    def close(self) -> None:
        self._appender.close()


def check_settings(out_dir: Path, settings: Mapping[str, Any], write: bool, workdir: Path | None = None) -> None:
    """Refuses to mix candidates sampled with different settings in one directory.

    The first run records `settings`; later runs must match them field by field.
    """
    from agfsync_jax.done_marker import redo_hint
    from agfsync_jax.errors import StageChangedError
    from agfsync_jax.fingerprint import changed_fields

    path = out_dir / SETTINGS_FILE
    if path.exists():
        recorded = storage.read_json(path)
        changed = changed_fields(recorded, settings)
        if changed:
            detail = ", ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed[:8])
            raise StageChangedError(f"sample: the candidates in {out_dir} were sampled with other settings ({detail}); "
                                    f"{redo_hint('sample', workdir or out_dir.parent)}")
    elif write:
        storage.write_json(path, dict(settings))


def missing_keys(expected: Iterable[CandidateKey], rows: Mapping[CandidateKey, ManifestRow]) -> list[CandidateKey]:
    return [k for k in expected if k not in rows]

