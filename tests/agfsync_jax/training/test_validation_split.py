"""The held-out split: stable, by prompt, recorded once, and never part of a training batch;
validation batches are fixed; non-sft losses refuse SFT records; summaries TensorBoard reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.pairs.dataset import PairDataset
from agfsync_jax.training import losses, pair_kinds, summaries, validation_split
from configs import common


def _train_cfg(**overrides):
    cfg = common.base_config().train
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def test_held_out_ids_are_stable_and_keep_a_prompt_together():
    ids = [f"p{i:03d}" for i in range(400)] + ["p007"] * 3  # p007 has four pairs
    fraction = validation_split.held_out_ids(ids, 0.25, 0)
    assert fraction == validation_split.held_out_ids(list(reversed(ids)), 0.25, 0)  # order-free
    assert 60 < len(fraction) < 140  # about a quarter of 400 distinct ids
    assert all(validation_split.split_key(p) < 0.25 for p in fraction)
    by_count = validation_split.held_out_ids(ids, 0.0, 10)
    pairs = sum(ids.count(p) for p in by_count)
    assert 10 <= pairs <= 13 and len(by_count) <= 10
    # The ids with the smallest keys, whatever else is in the dataset.
    assert by_count == set(sorted(set(ids), key=validation_split.split_key)[:len(by_count)])


@pytest.fixture()
def pairs(tmp_path, pair_writer) -> Path:
    return pair_writer(tmp_path / workdir_lib.PAIRS, 24, shards=3)


def test_held_out_pairs_never_appear_in_training_batches(pairs, tmp_path):
    cfg = _train_cfg(val_pairs=5)
    split = validation_split.load_or_make_split(cfg, pairs, tmp_path / "train", resuming=False)
    assert len(split.held_out) >= 5 and len(split.train) + len(split.held_out) == 24
    held = set(split.held_out_prompt_ids)
    train = PairDataset(pairs, global_batch_size=4, seed=0, records=split.train)
    seen = set()
    for _ in range(3 * train.batches_per_epoch):  # three epochs
        seen.update(next(train)["prompt_id"])
    assert seen and not seen & held
    assert len(seen) == len(split.train)  # every training pair is visited
    val = PairDataset(pairs, global_batch_size=2, seed=0, records=split.held_out)
    first, second = list(val.fixed_batches()), list(val.fixed_batches())
    assert len(first) == len(split.held_out) // 2
    assert {p for b in first for p in b["prompt_id"]} <= held
    for a, b in zip(first, second):  # the same batches every time, in the same order
        assert list(a["prompt_id"]) == list(b["prompt_id"])
        np.testing.assert_array_equal(a["winner_latent"], b["winner_latent"])
    assert val.state()["batch"] == 0  # reading them moves no position

    # Recorded: a second start reads the file; a changed config or dataset is refused.
    record = json.loads((tmp_path / "train" / validation_split.SPLIT_FILE).read_text())
    assert record["settings"] == {"val_fraction": 0.0, "val_pairs": 5} and len(record["held_out"]) == len(held)
    again = validation_split.load_or_make_split(cfg, pairs, tmp_path / "train", resuming=True)
    assert again == split
    # Validation switched off later: the recorded split still holds the pairs out.
    off = validation_split.load_or_make_split(_train_cfg(), pairs, tmp_path / "train", resuming=True)
    assert off == split
    with pytest.raises(ValueError, match="the split of a run cannot change"):
        validation_split.load_or_make_split(_train_cfg(val_pairs=6), pairs, tmp_path / "train", resuming=True)


def test_a_split_cannot_start_in_the_middle_of_a_run(pairs, tmp_path):
    with pytest.raises(ValueError, match="started without a held-out split"):
        validation_split.load_or_make_split(_train_cfg(val_fraction=0.2), pairs, tmp_path / "train", resuming=True)
    assert validation_split.load_or_make_split(_train_cfg(), pairs, tmp_path / "train", resuming=True) is None
    with pytest.raises(ValueError, match="not both"):
        validation_split.check_settings(_train_cfg(val_fraction=0.2, val_pairs=3))
    with pytest.raises(ValueError, match="holds out 24 of the 24 pairs"):
        validation_split.load_or_make_split(_train_cfg(val_pairs=100), pairs, tmp_path / "t2", resuming=False)


def test_losses_that_read_losers_refuse_sft_records(tmp_path):
    raw = {"prompt_id": np.array(["a", "b"], object), "is_cross": np.zeros(2, bool), "is_sft": np.array([False, True])}
    pair_kinds.check_batch(losses.get_loss("sft"), raw)
    for name in ("dpo", "released_code_dpo"):
        with pytest.raises(ValueError, match=r"train.loss='%s'.*\['b'\].*train.loss=sft" % name):
            pair_kinds.check_batch(losses.get_loss(name), raw)
    (tmp_path / workdir_lib.DONE_MARKER).write_text(json.dumps({"pairs": 5, "pairs_by_kind": {"sft": 5}}))
    pair_kinds.check_dataset(losses.get_loss("sft"), tmp_path)
    with pytest.raises(ValueError, match="holds 5 SFT records"):
        pair_kinds.check_dataset(losses.get_loss("dpo"), tmp_path)
    (tmp_path / workdir_lib.DONE_MARKER).write_text(json.dumps({"pairs": 5, "pairs_by_kind": {"agfsync": 5}}))
    pair_kinds.check_dataset(losses.get_loss("dpo"), tmp_path)
    with pytest.raises(ValueError, match="needs 'cross' pairs only"):
        pair_kinds.check_dataset(losses.get_loss("cross_dpo"), tmp_path)


def test_image_and_scalar_summaries_read_back_as_tensorboard_writes_them(tmp_path):
    from PIL import Image

    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tf = tensorflow_cpu_only()
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    grid = summaries.tile(images, columns=2)
    assert grid.shape == (18, 14, 3) and (grid[8:10] == 255).all()  # 2 x 2 with a 2-pixel gap
    np.testing.assert_array_equal(grid[10:, 8:], images[3])
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default(step=7):
        tf.summary.write("val/samples", summaries.image_tensor(tf, grid), metadata=summaries.image_metadata())
        tf.summary.write("val/loss", tf.constant(0.5), metadata=summaries.scalar_metadata())
    writer.close()
    seen = {}
    for path in tmp_path.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                seen[value.tag] = (event.step, value)
    step, image = seen["val/samples"]
    assert step == 7 and image.metadata.plugin_data.plugin_name == "images"
    assert image.metadata.data_class == 3  # DATA_CLASS_BLOB_SEQUENCE, what the image plugin reads
    width, height, png = image.tensor.string_val
    assert (int(width), int(height)) == (14, 18)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid)
    _, loss = seen["val/loss"]
    assert loss.metadata.plugin_data.plugin_name == "scalars" and float(tf.make_ndarray(loss.tensor)) == 0.5
