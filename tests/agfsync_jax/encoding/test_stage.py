"""Stage `encode` on tiny datasets: records that TFDS loads and training reads, latents equal to
diffusers' PyTorch VAE on diffusers' preprocessing, counted skips, resumption and refusals."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.encoding import stage
from agfsync_jax.pairs.records import decode_latent

RESOLUTION = 32


def _png(seed: int, shape=(40, 56)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape + (3,), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _config(model_path: Path, **encode):
    from configs import tiny

    c = tiny.get_config()
    c.model.tiny, c.model.path = "", str(model_path)
    c.encode.batch_size, c.encode.rows_per_shard = 2, 2
    for k, v in encode.items():
        setattr(c.encode, k, v)
    return c


def _records(pairs_dir: Path) -> list[dict]:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(pairs_dir))
    return list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))


def _torch_latents(model_path: Path, images: list[bytes]) -> np.ndarray:
    """The oracle: diffusers' VaeImageProcessor + PyTorch AutoencoderKL, posterior mean x scaling."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(model_path / "vae").eval()
    pixels = torch.cat([VaeImageProcessor(do_convert_rgb=True).preprocess(
        Image.open(io.BytesIO(b)), height=RESOLUTION, width=RESOLUTION, resize_mode="crop") for b in images])
    with torch.no_grad():
        return (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).numpy()


def _latent(record: dict, key: str) -> np.ndarray:
    return decode_latent(record[key], tuple(record["latent_shape"]), key).astype(np.float32)


def test_sft_jsonl_becomes_sft_records(tmp_path, tiny_sd1_path, capsys):
    images = {f"{i}.png": _png(i, (30 + 7 * i, 50)) for i in range(3)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [{"prompt": "a red fox", "image": "0.png", "category": "animals"}, {"prompt": "", "image": "1.png"},
            {"prompt": "a house", "image": "broken.png"}, {"prompt": "a car"}, {"prompt": "a tree", "image": "1.png"},
            {"prompt": "a red fox", "image": "2.png"}]
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(tiny_sd1_path, format="jsonl", path=str(source), latent="mean", store_png=True,
                     category_key="category")
    summary = stage.run(config, str(tmp_path / "wd"))
    out = capsys.readouterr().out
    print(out)
    assert summary["records"] == 3 and summary["shards"] == 3 and summary["complete"]
    assert summary["skipped"] == {"missing prompt": 1, "unreadable image": 1, "missing image": 1}
    assert "1 missing image, 1 missing prompt, 1 unreadable image" in out

    pairs_dir = tmp_path / "wd" / workdir_lib.PAIRS
    done = json.loads((pairs_dir / workdir_lib.DONE_MARKER).read_text())
    assert done["pairs"] == 3 and done["pairs_by_kind"] == {"sft": 3} and done["rows"] == 6
    records = _records(pairs_dir)
    assert [r["prompt"].decode() for r in records] == ["a red fox", "a tree", "a red fox"]
    assert {r["pair_kind"] for r in records} == {b"sft"}
    assert [r["category"] for r in records] == [b"animals", b"external", b"external"]
    # One prompt, one id: both "a red fox" rows share it (a held-out split keeps them together).
    ids = [r["prompt_id"].decode() for r in records]
    assert ids[0] == ids[2] != ids[1] and ids[0].startswith("ext-")
    expected = _torch_latents(tiny_sd1_path, [images["0.png"], images["1.png"], images["2.png"]])
    for record, reference in zip(records, expected):
        winner = _latent(record, "winner_latent")
        np.testing.assert_array_equal(winner, _latent(record, "loser_latent"))
        # float16 storage: about 3 significant digits.
        np.testing.assert_allclose(winner, reference, rtol=2e-3, atol=2e-3)
        from PIL import Image

        assert Image.open(io.BytesIO(record["winner_png"])).size == (RESOLUTION, RESOLUTION)
    scores = json.loads(records[1]["scores_json"])
    assert scores["winner"]["where"] == f"{source}:5" and scores["winner"]["row"] == 4

    # Re-running finds everything done and loads no model.
    again = stage.run(config, str(tmp_path / "wd"))
    assert again["shards_encoded"] == 0 and again["shards_skipped_done"] == 3 and again["complete"]


def test_pick_a_pic_parquet_pairs_follow_the_label(tmp_path, tiny_sd1_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jpg = [(_png(10 + i), _png(20 + i)) for i in range(3)]
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "jpg_0": [a for a, _ in jpg], "jpg_1": [b for _, b in jpg],
                             "label_0": [1.0, 0.5, 0.0]}), tmp_path / "train-00000-of-00001.parquet")
    config = _config(tiny_sd1_path, format="parquet", path=str(tmp_path), prompt_key="caption",
                     image_keys="jpg_0,jpg_1", label_key="label_0", latent="mean")
    summary = stage.run(config, str(tmp_path / "wd"))
    assert summary["records"] == 2 and summary["skipped"] == {"tie (label 0.5)": 1}
    records = _records(tmp_path / "wd" / workdir_lib.PAIRS)
    assert [(r["prompt"], r["pair_kind"], r["winner_candidate"], r["loser_candidate"]) for r in records] == [
        (b"a", b"agfsync", 0, 1), (b"c", b"agfsync", 1, 0)]
    expected = _torch_latents(tiny_sd1_path, [jpg[0][0], jpg[0][1], jpg[2][1], jpg[2][0]])
    got = [_latent(records[0], "winner_latent"), _latent(records[0], "loser_latent"),
           _latent(records[1], "winner_latent"), _latent(records[1], "loser_latent")]
    np.testing.assert_allclose(np.stack(got), expected, rtol=2e-3, atol=2e-3)


def test_interrupted_run_resumes_shard_by_shard(tmp_path, tiny_sd1_path, monkeypatch):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
        (tmp_path / f"{i}.txt").write_text(f"picture {i}")
    config = _config(tiny_sd1_path, format="folder", path=str(tmp_path), rows_per_shard=1, latent="sample", seed=3)
    pairs_dir = tmp_path / "wd" / workdir_lib.PAIRS

    write = stage._Encoder._write

    def fail_on_shard_2(self, shard):
        if shard.index == 2:
            raise KeyboardInterrupt("killed while writing shard 2")
        write(self, shard)
    monkeypatch.setattr(stage._Encoder, "_write", fail_on_shard_2)
    with pytest.raises(KeyboardInterrupt):
        stage.run(config, str(tmp_path / "wd"))
    assert not (pairs_dir / workdir_lib.DONE_MARKER).exists() and not (pairs_dir / "dataset_info.json").exists()
    assert sorted(p.name for p in pairs_dir.glob("encode-summary-*")) == [
        "encode-summary-00000-of-00004.json", "encode-summary-00001-of-00004.json"]
    assert not list(pairs_dir.glob(".tmp-*"))  # no torn temp file left
    first = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in pairs_dir.glob("agfsync_pairs-*")}

    monkeypatch.setattr(stage._Encoder, "_write", write)
    resumed = stage.run(config, str(tmp_path / "wd"))
    assert resumed["shards_encoded"] == 2 and resumed["shards_skipped_done"] == 2 and resumed["complete"]
    for name, (data, mtime) in first.items():  # finished shards were not rewritten
        assert (pairs_dir / name).read_bytes() == data and os.stat(pairs_dir / name).st_mtime_ns == mtime

    # The posterior samples are a function of (seed, row, image): a fresh run writes the same records.
    fresh = stage.run(config, str(tmp_path / "fresh"))
    assert fresh["records"] == 4
    comparable = lambda records: [{k: np.asarray(v).tolist() for k, v in r.items()} for r in records]  # noqa: E731
    assert comparable(_records(tmp_path / "fresh" / workdir_lib.PAIRS)) == comparable(_records(pairs_dir))
    mean_config = _config(tiny_sd1_path, format="folder", path=str(tmp_path), rows_per_shard=1, latent="mean")
    stage.run(mean_config, str(tmp_path / "mean"))
    sampled, mean = _records(pairs_dir), _records(tmp_path / "mean" / workdir_lib.PAIRS)
    assert not np.allclose(_latent(sampled[0], "winner_latent"), _latent(mean[0], "winner_latent"), atol=1e-4)

    # Other settings for the same pairs folder are refused, naming what changed.
    with pytest.raises(RuntimeError, match=r"other settings \(encode.latent, encode.seed changed\); `agfsync-jax clean encode"):
        stage.run(mean_config, str(tmp_path / "wd"))


def test_a_pairs_folder_of_the_scoring_stage_is_refused(tmp_path, tiny_sd1_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    (tmp_path / "a.txt").write_text("a")
    pairs_dir = tmp_path / "wd" / workdir_lib.PAIRS
    pairs_dir.mkdir(parents=True)
    (pairs_dir / "summary-00000-of-00001.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        stage.run(_config(tiny_sd1_path, format="folder", path=str(tmp_path)), str(tmp_path / "wd"))


def test_encode_is_a_cli_stage():
    from agfsync_jax import stages

    assert stages.get("encode").module == "agfsync_jax.encoding.stage" and not stages.get("encode").in_pipeline


def test_limit_encodes_the_first_rows(tmp_path, tiny_sd1_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
        (tmp_path / f"{i}.txt").write_text(f"picture {i}")
    summary = stage.run(_config(tiny_sd1_path, format="folder", path=str(tmp_path), limit=2), str(tmp_path / "wd"))
    assert summary["rows"] == 2 and summary["records"] == 2
    assert [r["prompt"] for r in _records(tmp_path / "wd" / workdir_lib.PAIRS)] == [b"picture 0", b"picture 1"]
