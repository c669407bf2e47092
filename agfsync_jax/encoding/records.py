"""An encoded external row -> the feature dict of one pair record (keys: schemas.PAIR_FEATURES).

External rows go into the same dataset format as the scoring stage's pairs, so training reads
them unchanged:

* a preference pair (two images) is a plain pair, kind PAIR_AGFSYNC ("under `prompt`, winner >
  loser"); image 0 wins when the row's label is above 0.5 (or when there is no label), image 1
  when it is below;
* an SFT row (one image) has kind PAIR_SFT and its latent stored as both winner and loser, so
  the record has the usual shape; `train.loss=sft` reads only winners, and every other loss
  refuses SFT records (a DPO margin between an image and itself is zero and teaches nothing).

`prompt_id` is the source's id when `encode.id_key` names one, else "ext-" + a hash of the
prompt text: pairs that share a prompt (Pick-a-Pic has many per caption) share an id, so a
split by prompt id (training's held-out pairs) never puts one prompt on both sides.
`winner_total`/`loser_total` hold the preference of each image (1 / 0; 0 for SFT rows): external
data has no AGFSync score. `scores_json` records where each image came from.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from agfsync_jax.encoding.source_rows import SourceRow
from agfsync_jax.schemas import LATENT_DTYPE, PAIR_AGFSYNC, PAIR_FEATURES, PAIR_SFT

DEFAULT_CATEGORY = "external"


def prompt_id(row: SourceRow) -> str:
    if row.row_id:
        return row.row_id
    if row.prompt is None:
        raise ValueError(f"{row.where}: a row without a prompt has no prompt id")
    return "ext-" + hashlib.blake2b(row.prompt.encode("utf-8"), digest_size=8).hexdigest()


def winner_slot(row: SourceRow) -> int:
    """Which image of a pair wins: 0 or 1 (a tie, label 0.5, is skipped before this)."""
    if row.label is None:
        return 0
    if row.label == 0.5:
        raise ValueError(f"{row.where}: a tie has no winner")
    return 0 if row.label > 0.5 else 1


def _latent_bytes(latent: np.ndarray) -> tuple[bytes, list[int]]:
    if latent.ndim != 3:
        raise ValueError(f"latent must be (C, H, W), got shape {latent.shape}")
    half = np.ascontiguousarray(latent.astype(LATENT_DTYPE))
    return half.tobytes(), [int(d) for d in half.shape]


def external_example(row: SourceRow, latents: tuple[np.ndarray, ...], pngs: tuple[bytes, ...],
                     source: str) -> dict[str, Any]:
    """The PAIR_FEATURES dict of a row whose images were encoded to `latents` (one per image, in
    row order); `pngs` are the preprocessed images as PNG, or empty bytes when not stored."""
    if len(latents) != len(row.images) or len(pngs) != len(row.images):
        raise ValueError(f"{row.where}: {len(row.images)} images but {len(latents)} latents / {len(pngs)} PNGs")
    if len(row.images) == 1:
        kind, win, lose = PAIR_SFT, 0, 0
        totals = (0.0, 0.0)
    else:
        kind = PAIR_AGFSYNC
        win = winner_slot(row)
        lose = 1 - win
        totals = (1.0, 0.0)
    w_bytes, shape = _latent_bytes(latents[win])
    l_bytes, _ = _latent_bytes(latents[lose])
    origin = lambda slot: {"source": source, "row": row.index, "where": row.where, "image": slot}  # noqa: E731
    example = {
        "pair_kind": kind.encode(),
        "prompt_id": prompt_id(row).encode(),
        "category": (row.category or DEFAULT_CATEGORY).encode(),
        "prompt": (row.prompt or "").encode(),
        "prompt_2": b"",
        "winner_latent": w_bytes,
        "loser_latent": l_bytes,
        "latent_shape": np.asarray(shape, np.int64),
        "winner_png": pngs[win],
        "loser_png": pngs[lose],
        "winner_candidate": win,
        "loser_candidate": lose,
        "winner_total": totals[0],
        "loser_total": totals[1],
        "scores_json": json.dumps({"winner": origin(win), "loser": origin(lose), "label": row.label},
                                  sort_keys=True).encode(),
    }
    if set(example) != set(PAIR_FEATURES):
        raise AssertionError(f"external_example keys drifted from PAIR_FEATURES: {set(example) ^ set(PAIR_FEATURES)}")
    return example
