"""HPS v2 scorer on a tiny open_clip model built in code, saved as HPS ships its checkpoints.

The oracle is open_clip itself: the in-memory model's forward (what `hpsv2.score()` calls) on
pixels prepared here with torch.nn.functional (not the scorer's torchvision code), and
open_clip's module-level `tokenize`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.scoring.scorer import ScoringItem

CPU, F32 = torch.device("cpu"), torch.float32
IMAGE_SIZE = 24
MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 2.0,
                   "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
PROMPTS = ["a red cat on a table", "two dogs in the park", "a blue car near the river",
           "an old wooden house", "a small bird in the sky", "three flowers in a vase",
           " ".join(["a red cat and a blue dog on a wooden table"] * 12)]  # > 77 tokens


def _build(root: Path, seed: int, cfg: dict = MODEL_CFG) -> tuple[torch.nn.Module, Path, str]:
    """A random open_clip CLIP, its folder (open_clip_config.json) and HPS-style checkpoint."""
    import open_clip

    root.mkdir(parents=True)
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg).eval()
    ckpt = root / "HPS_v2_test.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return model, ckpt, f"local-dir:{root}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("hps") / "model", seed=11)


@pytest.fixture(scope="module")
def images(candidate_images):
    rng = np.random.default_rng(5)
    extra = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in
             ((20, 32, 3),   # wider than tall: downscaled to 15 x 24, padded top/bottom
              (12, 16, 3),   # smaller than the model: upscaled to 18 x 24
              (24, 18, 3))]  # longest side already 24: padded only
    return list(candidate_images[:4]) + [Image.fromarray(a) for a in extra]


def _oracle_pixels(image: Image.Image) -> torch.Tensor:
    import open_clip

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = x.shape[1:]
    scale = IMAGE_SIZE / max(h, w)
    if scale != 1.0:
        x = torch.nn.functional.interpolate(x[None], size=(round(h * scale), round(w * scale)), mode="bicubic",
                                            align_corners=False, antialias=True)[0]
    ph, pw = IMAGE_SIZE - x.shape[1], IMAGE_SIZE - x.shape[2]
    x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    return (x - mean) / std


def _oracle_scores(model, images, prompts) -> np.ndarray:
    import open_clip

    pixels = torch.stack([_oracle_pixels(im) for im in images])
    with torch.no_grad():
        out = model(pixels, open_clip.tokenize(prompts))
    image_features, text_features = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    return 100.0 * torch.diagonal(image_features @ text_features.T).double().numpy()


def test_hps_score_is_100_cosine_of_open_clip_features(built, images):
    from data_prep.scoring.hps import HpsScorer

    model, ckpt, model_id = built
    scorer = HpsScorer(ckpt, model_id, CPU, F32, batch_size=3)  # 3 < 7 items: several batches
    prompts = PROMPTS[: len(images)]
    items = [ScoringItem(im, p) for im, p in zip(images, prompts)]
    got = scorer.score(items)
    np.testing.assert_allclose(got, _oracle_scores(model, images, prompts), atol=1e-4, rtol=0)
    assert np.ptp(got) > 1.0, got  # depends on image and prompt
    # Every image with one prompt: only the image moves the score.
    same_prompt = scorer.score([ScoringItem(im, PROMPTS[0]) for im in images])
    np.testing.assert_allclose(same_prompt, _oracle_scores(model, images, [PROMPTS[0]] * len(images)), atol=1e-4)
    assert scorer.score([]).shape == (0,)


def test_hps_preprocessing_matches_independent_resize_and_pad(images):
    import open_clip

    from data_prep.scoring.hps import preprocess

    for im in images:
        ours = preprocess(im, IMAGE_SIZE, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        assert ours.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(ours, _oracle_pixels(im), atol=1e-5, rtol=0)
    # The padding is zero *before* normalisation (hpsv2 pads the [0, 1] tensor): black borders.
    wide = preprocess(images[4], IMAGE_SIZE, (0.0,) * 3, (1.0,) * 3)
    assert torch.all(wide[:, :4] == 0) and torch.all(wide[:, -5:] == 0) and wide[:, 4:-5].abs().sum() > 0


def test_hps_checkpoint_layouts_load_the_same_model(built, images, tmp_path):
    from data_prep.scoring.hps import HpsScorer

    model, ckpt, model_id = built
    items = [ScoringItem(im, p) for im, p in zip(images, PROMPTS)]
    reference = HpsScorer(ckpt, model_id, CPU, F32).score(items)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    bare, ddp = tmp_path / "bare.pt", tmp_path / "ddp.pt"
    torch.save(state, bare)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, ddp)
    for path in (bare, ddp):
        np.testing.assert_allclose(HpsScorer(path, model_id, CPU, F32).score(items), reference, atol=1e-6)


def test_hps_version_follows_the_checkpoint_bytes(built, tmp_path):
    from data_prep.scoring.hps import HpsScorer

    _, ckpt, model_id = built
    version = HpsScorer(ckpt, model_id, CPU, F32).version
    assert version.startswith("hps:model:HPS_v2_test.pt:")
    copy = tmp_path / "copy" / ckpt.name
    copy.parent.mkdir()
    shutil.copy(ckpt, copy)
    assert HpsScorer(copy, model_id, CPU, F32).version == version
    _, other, other_id = _build(tmp_path / "model", seed=12)  # same names, other weights
    assert HpsScorer(other, other_id, CPU, F32).version != version


def test_hps_bad_inputs_name_the_file(built, tmp_path):
    from data_prep.scoring.hps import HpsScorer

    _, ckpt, model_id = built
    with pytest.raises(FileNotFoundError, match=r"scoring.hps_path: .*missing\.pt is not a file"):
        HpsScorer(tmp_path / "missing.pt", model_id, CPU, F32)
    # A checkpoint of another architecture (wider embedding): the shape that differs is named.
    _, wide, _ = _build(tmp_path / "wide", seed=0, cfg={**MODEL_CFG, "embed_dim": 8})
    with pytest.raises(ValueError, match=r"HPS_v2_test\.pt: text_projection has shape \(32, 8\).*\(32, 16\)"):
        HpsScorer(wide, model_id, CPU, F32)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    state.pop("ln_final.weight")
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(ValueError, match=r"broken\.pt does not fit .*\['ln_final.weight'\].*\['extra.weight'\]"):
        HpsScorer(broken, model_id, CPU, F32)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: not a loadable torch checkpoint"):
        HpsScorer(junk, model_id, CPU, F32)
    torch.save({"state_dict": {"a": 1}}, broken)
    with pytest.raises(ValueError, match=r"broken\.pt: expected a state dict of tensors"):
        HpsScorer(broken, model_id, CPU, F32)
    with pytest.raises(ValueError, match=r"scoring.hps_model is 'ViT-Q-99'"):
        HpsScorer(ckpt, "ViT-Q-99", CPU, F32)
    with pytest.raises(FileNotFoundError, match=r"nowhere/open_clip_config.json does not exist"):
        HpsScorer(ckpt, f"local-dir:{tmp_path / 'nowhere'}", CPU, F32)


def test_hps_is_a_reward_and_an_extra_through_the_factory(built, images):
    from configs.common import base_config
    from data_prep.scoring import factory

    model, ckpt, model_id = built
    assert factory.required_scorers({"clip": 0.5, "hps": 0.5}, "") == ["clip", "hps"]
    assert factory.required_scorers({"clip": 1.0}, "hps") == ["clip", "hps"]
    assert base_config().scoring.hps_model == "ViT-H-14"
    scoring = base_config().scoring
    scoring.update(dict(hps_path=str(ckpt), hps_model=model_id, device="cpu"))
    scorer = factory.build_scorer("hps", scoring)
    assert scorer.name == "hps" and scorer.version.startswith("hps:")
    np.testing.assert_allclose(scorer.score([ScoringItem(images[0], PROMPTS[0])]),
                               _oracle_scores(model, images[:1], PROMPTS[:1]), atol=1e-4)
    scoring.hps_path = ""
    with pytest.raises(ValueError, match=r"scorer 'hps' is needed but scoring.hps_path is empty"):
        factory.build_scorer("hps", scoring)


def test_tiny_hps_model_loads_through_the_scorer(tmp_path, images):
    from data_prep.scoring import tiny
    from data_prep.scoring.hps import HpsScorer

    folder = tiny.save_tiny_hps(tmp_path / "hps", seed=5)
    scorer = HpsScorer(folder / tiny.HPS_CHECKPOINT, f"local-dir:{folder}", CPU, F32)
    scores = scorer.score([ScoringItem(im, p) for im, p in zip(images, PROMPTS)])
    assert scores.shape == (len(images),) and np.all(np.isfinite(scores)) and np.ptp(scores) > 0
    again = tiny.save_tiny_hps(tmp_path / "hps2", seed=5)
    assert HpsScorer(again / tiny.HPS_CHECKPOINT, f"local-dir:{again}", CPU, F32).version.split(":")[-1] == \
        scorer.version.split(":")[-1]  # the same seed builds the same weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hps_cuda_autocast_matches_cpu(built, images):
    from data_prep.scoring.device import select_device
    from data_prep.scoring.hps import HpsScorer

    _, ckpt, model_id = built
    device, dtype = select_device("auto")
    items = [ScoringItem(im, p) for im, p in zip(images, PROMPTS)]
    gpu = HpsScorer(ckpt, model_id, device, dtype)
    assert next(gpu.model.parameters()).dtype == torch.float32  # amp: float32 weights, float16 compute
    np.testing.assert_allclose(gpu.score(items), HpsScorer(ckpt, model_id, CPU, F32).score(items), atol=0.5)
