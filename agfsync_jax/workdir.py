"""The work directory layout (docs/design.md section 3), named once.

WORKDIR/
  base_model/   the tiny default's materialised diffusers folder (tiny configs only)
  prompts/      prompts.jsonl
  candidates/   images, latents, manifest-*.jsonl
  scores/       scores-*.jsonl
  pairs/        TFRecord shards + TFDS metadata
  train/        orbax checkpoints, TensorBoard events, config.json
  export/       diffusers pipeline folder
  eval/<set>/   one prompt set's evaluation: metrics.json, report.md, grids, and
    base/ finetuned/   each a small work directory of its own (prompts, candidates, scores)
    judge/             the VLM judge's judgments.jsonl, summary.json and reply cache
"""

from __future__ import annotations

from agfsync_jax.storage import Path, PathLike, as_path

BASE_MODEL = "base_model"
PROMPTS = "prompts"
PROMPTS_FILE = "prompts/prompts.jsonl"
CANDIDATES = "candidates"
SCORES = "scores"
PAIRS = "pairs"
TRAIN = "train"
EXPORT = "export"
EVAL = "eval"
# Relative to an eval set's directory (WORKDIR/eval/<set>).
JUDGE = "judge"
JUDGE_JUDGMENTS = "judge/judgments.jsonl"
JUDGE_SUMMARY = "judge/summary.json"

# A stage writes this file last, atomically; its presence means "complete, skip on re-run".
DONE_MARKER = "_DONE.json"


def stage_dir(workdir: PathLike, stage: str) -> Path:
    return as_path(workdir) / stage


def shard_suffix(shard_index: int, num_shards: int) -> str:
    """File-name suffix for shard i of n, e.g. '00001-of-00004'."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    return f"{shard_index:05d}-of-{num_shards:05d}"
