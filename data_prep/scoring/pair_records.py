"""A selected pair (data_prep.scoring.pairs.Pair) as a pair record of the dataset format."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from agfsync_jax.pairs.records import pair_features
from data_prep.scoring.pairs import Pair


def pair_example(pair: Pair, winner_latent: np.ndarray, loser_latent: np.ndarray,
                 winner_png: bytes = b"", loser_png: bytes = b"") -> dict[str, Any]:
    """The feature dict of one pair; keys are exactly PAIR_FEATURES."""
    return pair_features(
        pair_kind=pair.kind, prompt_id=pair.record.id, category=pair.record.category, prompt=pair.prompt,
        prompt_2=pair.prompt_2, winner_latent=winner_latent, loser_latent=loser_latent, winner_png=winner_png,
        loser_png=loser_png, winner_candidate=pair.winner.candidate, loser_candidate=pair.loser.candidate,
        winner_total=pair.winner.total, loser_total=pair.loser.total,
        scores_json=json.dumps({"winner": pair.winner.to_dict(), "loser": pair.loser.to_dict()}, sort_keys=True))
