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
    from agfsync_jax.pairs.records import shard_filename, tfds_features, write_tfrecord
    from data_prep.scoring.pair_records import pair_example
    from data_prep.scoring.pairs import Pair
    from agfsync_jax import done_marker
    from agfsync_jax.pairs.metadata import write_tfds_metadata

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
    # Finished as the score stage finishes it, so the train stage accepts the folder.
    done_marker.write(out, {"pairs": num_pairs, "shards": shards},
                      {"test.pairs": [num_pairs, seed, cross, shards]})
    return out


@pytest.fixture(scope="session")
def pair_writer():
    """`write_pairs(out, num_pairs, seed=0, cross=False, shards=2) -> out`."""
    return write_pairs


@pytest.fixture(scope="session")
def micro_sd1_path(tmp_path_factory) -> Path:
    """The tiny SD1.x pipeline with an even smaller UNet (one down and one up block).

    Same classes and loading path as every SD folder; about half the tiny UNet's compile time,
    for the tests that exercise the loop's mechanics (sharding, processes, resume) rather than
    the model.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from agfsync_jax.tiny import pipeline as tiny

    pipe = tiny.build_tiny_pipeline("sd1", seed=0)
    torch.manual_seed(1)
    pipe.register_modules(unet=UNet2DConditionModel(
        sample_size=tiny.TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=32))
    out = tmp_path_factory.mktemp("models") / "micro-sd1"
    pipe.save_pretrained(out, safe_serialization=True)
    return out
