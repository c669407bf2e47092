"""External images end to end: a folder of PNGs with captions -> encode -> sft training with
validation on; preference pairs in a JSONL -> encode -> dpo. DPO on SFT records is refused."""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.training import train

pytestmark = pytest.mark.slow  # encodes, then compiles and runs two short trainings: minutes on 2 CPU cores

WORDS = "red blue green cat dog bird house tree car boat".split()


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 40, (36, 44, 3)) + np.linspace(0, 60, 44)[None, :, None], 0, 255)
    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _config(model_path: Path, **train_overrides):
    from configs import tiny

    c = tiny.get_config()
    c.model.tiny, c.model.path = "", str(model_path)
    c.encode.batch_size, c.encode.rows_per_shard = 4, 4
    c.train.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 2, 4, 1, 4
    c.train.text_encoding = "cached"
    c.train.val_pairs, c.train.eval_every, c.train.val_prompts = 0, 0, ()  # the tests that validate set them
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


def _events(workdir: Path, prefix: str) -> dict[str, dict[int, object]]:
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tf = tensorflow_cpu_only()
    out: dict[str, dict[int, object]] = {}
    for path in glob.glob(str(workdir / workdir_lib.TRAIN / train.TENSORBOARD / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith(prefix):
                    out.setdefault(value.tag, {})[event.step] = value
    return out


def test_folder_to_sft_with_validation(tmp_path, micro_sd1_path):
    from agfsync_jax.encoding import stage
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        (images / f"{i:02d}.png").write_bytes(_png(i))
        (images / f"{i:02d}.txt").write_text(f"a {WORDS[i]} {WORDS[9 - i]}")
    wd = tmp_path / "wd"
    config = _config(micro_sd1_path, loss="sft", val_pairs=2, eval_every=2, val_batch_size=2,
                     val_prompts=("a red cat",), val_images_per_prompt=2, val_sample_steps=2)
    config.encode.format, config.encode.path = "folder", str(images)
    assert stage.run(config, str(wd))["complete"]

    # A DPO loss is refused before any model is loaded: the records have no losers.
    dpo = _config(micro_sd1_path, loss="dpo")
    with pytest.raises(ValueError, match="holds 8 SFT records.*train.loss=sft"):
        train.train_and_evaluate(dpo, wd)

    summary = train.train_and_evaluate(config, wd)
    assert summary["step"] == 4 and np.isfinite(summary["loss"]) and summary["nonfinite_steps"] == 0
    assert summary["val"]["pairs"] == 2.0 and np.isfinite(summary["val"]["loss"])
    split = json.loads((wd / workdir_lib.TRAIN / "val_split.json").read_text())
    assert len(split["held_out"]) == 2
    events = _events(wd, "val/")
    assert sorted(events["val/loss"]) == [2, 4] and sorted(events["val/samples"]) == [2, 4]
    tf = tensorflow_cpu_only()
    losses = [float(tf.make_ndarray(events["val/loss"][s].tensor)) for s in (2, 4)]
    assert all(np.isfinite(losses)) and losses[0] != losses[1]  # the same pairs and noise, other params
    width, height, png = events["val/samples"][4].tensor.string_val
    from PIL import Image

    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert grid.shape == (int(height), int(width), 3) == (32, 66, 3)  # 1 prompt x 2 seeds of 32 px, 2 px gap
    assert sorted(p.name for p in (wd / workdir_lib.TRAIN / "val_samples").iterdir()) == [
        "step-0000002.png", "step-0000004.png"]


def test_preference_jsonl_to_dpo(tmp_path, micro_sd1_path):
    from agfsync_jax.encoding import stage

    rows = []
    for i in range(6):
        (tmp_path / f"w{i}.png").write_bytes(_png(100 + i))
        (tmp_path / f"l{i}.png").write_bytes(_png(200 + i))
        rows.append({"prompt": f"a {WORDS[i]} {WORDS[i + 1]}", "winner": f"w{i}.png", "loser": f"l{i}.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wd = tmp_path / "wd"
    config = _config(micro_sd1_path, loss="dpo", learning_rate=1e-4)
    config.encode.path, config.encode.image_keys = str(tmp_path / "pairs.jsonl"), "winner,loser"
    done = stage.run(config, str(wd))
    assert done["records"] == 6
    summary = train.train_and_evaluate(config, wd)
    assert summary["step"] == 4 and np.isfinite(summary["loss"]) and 0.0 <= summary["implicit_acc"] <= 1.0
    steps = _events(wd, "train/loss")["train/loss"]
    assert sorted(steps) == [1, 2, 3, 4]
