"""The candidates a shard scores, and loading their image and latent with a reason on failure.

Prompts are assigned to shards by their position in the sorted list of prompt ids (i::n), so all
candidates of a prompt (both instructions of an InstructEngine record) land in one shard and the
best/worst choice needs no cross-shard step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from PIL import Image

from agfsync_jax import storage
from agfsync_jax.atomic_io import read_complete_lines
from agfsync_jax.schemas import KIND_INSTRUCTION_PAIR, ManifestRow, PromptRecord, Question, SchemaError
from agfsync_jax.storage import Path

MANIFEST_GLOB = "manifest-*.jsonl"


class BadCandidate(Exception):
    """A candidate's image or latent is missing or unreadable; `reason` is a short tag."""

    def __init__(self, reason: str, path: Path, detail: str = ""):
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
        self.reason, self.path, self.detail = reason, path, detail


@dataclasses.dataclass(frozen=True)
class Candidate:
    row: ManifestRow
    record: PromptRecord
    where: str  # manifest file:line, for error messages

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.row.prompt_id, self.row.instruction, self.row.candidate)

    @property
    def text(self) -> str:
        """The instruction this candidate was sampled for."""
        return self.record.instructions[self.row.instruction]

    @property
    def questions(self) -> tuple[Question, ...]:
        return self.record.questions_2 if self.row.instruction == 1 else self.record.questions


def shard_prompt_ids(records: Mapping[str, PromptRecord], shard_index: int, shard_count: int) -> list[str]:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard.index {shard_index} is not in [0, {shard_count})")
    return sorted(records)[shard_index::shard_count]


def read_candidates(candidates_dir: Path, records: Mapping[str, PromptRecord],
                    prompt_ids: set[str]) -> list[Candidate]:
    """Manifest rows of `prompt_ids`, checked against the prompt records, sorted by key.

    As the sampler does: a torn last line (a writer killed mid-append) is dropped, and a candidate
    listed twice (re-sampled after a failed check, same file paths) counts once, first row first.
    """
    manifests = sorted(candidates_dir.glob(MANIFEST_GLOB))
    if not manifests:
        raise FileNotFoundError(f"no {MANIFEST_GLOB} in {candidates_dir}; run the sampling stage first")
    found: dict[tuple[str, int, int], Candidate] = {}
    for manifest in manifests:
        for i, obj in enumerate(read_complete_lines(manifest)):
            where = f"{manifest} row {i + 1}"
            row = ManifestRow.from_dict(obj, where)
            record = records.get(row.prompt_id)
            if record is None:
                raise SchemaError(f"{where}: prompt_id {row.prompt_id!r} is not in prompts.jsonl")
            if row.instruction == 1 and record.kind != KIND_INSTRUCTION_PAIR:
                raise SchemaError(f"{where}: instruction 1 for prompt {row.prompt_id!r} of kind {record.kind!r}")
            if not row.image:
                raise SchemaError(f"{where}: candidate has no image (sampled with sampling.save_png=False?); "
                                  "the scorers need the decoded images")
            if row.prompt_id not in prompt_ids:
                continue
            cand = Candidate(row=row, record=record, where=where)
            found.setdefault(cand.key, cand)
    return [found[k] for k in sorted(found)]


def load_image(path: Path) -> Image.Image:
    """The decoded RGB image; missing or undecodable files raise BadCandidate."""
    if not path.is_file():
        raise BadCandidate("missing_image", path)
    try:
        # Decoded now: a truncated PNG fails here, not inside a scorer.
        return storage.open_image(path).convert("RGB")
    # PIL signals some malformed chunks with SyntaxError.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadCandidate("corrupt_image", path, str(e)) from e


def load_latent(path: Path) -> np.ndarray:
    """The (C, H, W) float32 latent; it must also be representable in float16 (the pair format)."""
    if not path.is_file():
        raise BadCandidate("missing_latent", path)
    try:
        latent = storage.read_npy(path)
    except (OSError, ValueError, EOFError) as e:
        raise BadCandidate("corrupt_latent", path, str(e)) from e
    if latent.dtype != np.float32 or latent.ndim != 3:
        raise BadCandidate("corrupt_latent", path, f"expected float32 (C,H,W), got {latent.dtype} {latent.shape}")
    with np.errstate(over="ignore"):
        finite16 = np.isfinite(latent.astype(np.float16)).all()
    if not finite16:
        raise BadCandidate("corrupt_latent", path, "non-finite or beyond float16 range")
    return latent
