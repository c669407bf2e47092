"""Which losses may train on which pair kinds, checked before the first step and on every batch.

InstructEngine's cross_dpo needs cross pairs. SFT records (external image + prompt data,
agfsync_jax/encoding) store their one image as both winner and loser: only a loss that never
reads losers (sft) may train on them; a DPO margin between an image and itself is zero and
would train nothing while reporting a loss of log 2.
"""

from __future__ import annotations

import json

import numpy as np

from agfsync_jax import storage, workdir as workdir_lib
from agfsync_jax.schemas import PAIR_CROSS, PAIR_SFT
from agfsync_jax.training.losses import LossSpec


def _sft_refusal(spec: LossSpec, what: str) -> str:
    return (f"train.loss={spec.name!r} compares a winner with a loser, but {what} SFT records (one image per "
            "prompt, encoded from an external dataset): train them with --config.train.loss=sft, or encode "
            "preference pairs (two encode.image_keys)")


def check_dataset(spec: LossSpec, pairs_dir: storage.PathLike) -> None:
    """Refuses a loss that cannot train on the dataset, from the counts in its done marker.

    The encode stage's marker counts records per kind (`pairs_by_kind`); a marker without
    counts (the scoring stage's) leaves the check to `check_batch`.
    """
    path = storage.as_path(pairs_dir) / workdir_lib.DONE_MARKER
    if not path.is_file():
        return
    kinds = json.loads(path.read_text()).get("pairs_by_kind") or {}
    if spec.reads_losers and kinds.get(PAIR_SFT, 0):
        raise ValueError(_sft_refusal(spec, f"{pairs_dir} holds {kinds[PAIR_SFT]}"))
    if spec.requires_pair_kind is not None and set(kinds) - {spec.requires_pair_kind}:
        raise ValueError(f"train.loss={spec.name!r} needs {spec.requires_pair_kind!r} pairs only; {pairs_dir} "
                         f"holds {kinds}")


def check_batch(spec: LossSpec, raw: dict[str, np.ndarray]) -> None:
    """Refuses a batch with records the loss cannot train on, naming their prompt ids."""
    def ids(mask: np.ndarray) -> str:
        bad = [str(p) for p, m in zip(raw["prompt_id"], mask) if m]
        return f"{bad[:5]}{' ...' if len(bad) > 5 else ''}"

    if spec.requires_pair_kind == PAIR_CROSS and not bool(np.all(raw["is_cross"])):
        raise ValueError(f"train.loss={spec.name!r} needs InstructEngine cross pairs; these pairs are "
                         f"not: {ids(~raw['is_cross'])}")
    if spec.reads_losers and "is_sft" in raw and bool(np.any(raw["is_sft"])):
        raise ValueError(_sft_refusal(spec, f"the batch holds {ids(raw['is_sft'])}, which are"))
