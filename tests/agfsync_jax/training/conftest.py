"""Training-test fixtures: tiny pair datasets written with the scoring stage's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agfsync_jax.schemas import PAIR_AGFSYNC, PAIR_CROSS, PromptRecord, ScoreRow

LATENT_SHAPE = (4, 16, 16)  # the tiny models' latents
_WORDS = "red blue green cat dog bird house tree car boat".split()


def write_pairs(out: Path, num_pairs: int, *, seed: int = 0, cross: bool = False,
                shards: int = 2) -> Path:
    """`num_pairs` pairs in `shards` TFRecord shards + TFDS metadata under `out`.

    Winners are drawn around +0.5 and losers around -0.5 (two distinct latent distributions).
    """
    from data_prep.scoring.pair_records import pair_example, shard_filename, tfds_features, write_tfrecord
    from data_prep.scoring.pairs import Pair
    from data_prep.scoring.tfds_metadata import write_tfds_metadata

    rng = np.random.default_rng(seed)
    features = tfds_features()
    per_shard = np.array_split(np.arange(num_pairs), shards)
    for shard, indices in enumerate(per_shard):
        serialized = []
        for i in indices:
            words = rng.choice(_WORDS, size=3)
            record = PromptRecord(
                id=f"p{i:04d}", category="animals", prompt=f"a {words[0]} {words[1]}", source="test",
                kind="instruction_pair" if cross else "prompt",
                prompt_2=f"a {words[2]} {words[1]}" if cross else "", divergence="aesthetic" if cross else "")
            row = lambda c, total, ins: ScoreRow(  # noqa: E731
                prompt_id=record.id, candidate=c, scores={"clip": total}, total=total, scorers={"clip": "t"},
                instruction=ins)
            pair = Pair(PAIR_CROSS if cross else PAIR_AGFSYNC, record, row(0, 60.0, 0), row(1, 40.0, int(cross)))
            winner = (0.5 + 0.5 * rng.standard_normal(LATENT_SHAPE)).astype(np.float32)
            loser = (-0.5 + 0.5 * rng.standard_normal(LATENT_SHAPE)).astype(np.float32)
            serialized.append(features.serialize_example(pair_example(pair, winner, loser)))
        write_tfrecord(out / shard_filename(shard, shards), serialized)
    assert write_tfds_metadata(out, shards) == num_pairs
    return out


@pytest.fixture(scope="session")
def pair_writer():
    """`write_pairs(out, num_pairs, seed=0, cross=False, shards=2) -> out`."""
    return write_pairs
