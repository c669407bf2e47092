"""Base vs finetuned image pairs of the same prompt and seed, read from the eval stage's folders.

WORKDIR/eval/<model>/prompts/prompts.jsonl and WORKDIR/eval/<model>/candidates/manifest-*.jsonl,
for model in (base, finetuned), as the eval stage writes them: one candidate (0) per prompt,
sampled with the same seed for both models.
"""

from __future__ import annotations

import collections
import dataclasses

from agfsync_jax import storage
from agfsync_jax.storage import Path, PathLike
from agfsync_jax import workdir as workdir_lib
from agfsync_jax.atomic_io import read_complete_lines
from agfsync_jax.schemas import ManifestRow, PromptRecord, SchemaError, read_prompts
from data_prep.judge.protocol import BASE, FINETUNED

MISSING_IMAGE = "missing_image"  # skip reason: a model has no image for the prompt


@dataclasses.dataclass(frozen=True)
class ImagePair:
    prompt_id: str
    prompt: str
    seed: int
    base_image: Path
    finetuned_image: Path


def _prompts(eval_dir: Path) -> list[PromptRecord]:
    base_path = eval_dir / BASE / workdir_lib.PROMPTS_FILE
    fine_path = eval_dir / FINETUNED / workdir_lib.PROMPTS_FILE
    for path in (base_path, fine_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no eval prompts; run the `eval` stage first")
    base, fine = read_prompts(base_path), read_prompts(fine_path)
    base_texts = {r.id: r.prompt for r in base}
    if base_texts != {r.id: r.prompt for r in fine}:
        raise ValueError(f"{base_path} and {fine_path} hold different prompts: the two models were "
                         "not evaluated on the same prompt set; re-run the `eval` stage")
    return base


def _manifest_rows(model_dir: Path) -> dict[str, ManifestRow]:
    """prompt_id -> the manifest row of its one eval candidate (first row wins, as in sampling)."""
    paths = sorted((model_dir / workdir_lib.CANDIDATES).glob("manifest-*.jsonl"))
    rows: dict[str, ManifestRow] = {}
    for path in paths:
        for i, obj in enumerate(read_complete_lines(path)):
            row = ManifestRow.from_dict(obj, f"{path} row {i + 1}")
            if row.candidate != 0 or row.instruction != 0:
                raise SchemaError(
                    f"{path} row {i + 1}: candidate {row.candidate}, instruction {row.instruction}; "
                    "the judge reads the eval stage's folders, which hold one candidate (0) per "
                    "plain prompt")
            rows.setdefault(row.prompt_id, row)
    return rows


def load_pairs(eval_dir: PathLike) -> tuple[list[ImagePair], collections.Counter[str]]:
    """The pairs in prompt-file order, and the count of prompts skipped per reason."""
    eval_dir = storage.as_path(eval_dir)
    records = _prompts(eval_dir)
    manifests = {m: _manifest_rows(eval_dir / m) for m in (BASE, FINETUNED)}
    pairs, skipped = [], collections.Counter()
    for r in records:
        rows = {m: manifests[m].get(r.id) for m in (BASE, FINETUNED)}
        if any(row is None or not row.image for row in rows.values()):
            skipped[MISSING_IMAGE] += 1
            continue
        if rows[BASE].seed != rows[FINETUNED].seed:
            raise ValueError(f"prompt {r.id!r}: the base image has seed {rows[BASE].seed} and the "
                             f"finetuned one {rows[FINETUNED].seed} ({eval_dir}/*/candidates); the "
                             "judge compares images of the same seed; re-run the `eval` stage")
        pairs.append(ImagePair(
            prompt_id=r.id, prompt=r.prompt, seed=rows[BASE].seed,
            base_image=eval_dir / BASE / workdir_lib.CANDIDATES / rows[BASE].image,
            finetuned_image=eval_dir / FINETUNED / workdir_lib.CANDIDATES / rows[FINETUNED].image))
    return pairs, skipped
