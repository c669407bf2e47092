"""Tiny UNet pretraining: the synthetic data, that the denoising loss falls, SDXL conditioning,
and the cached base model's build record (a stale cache is refused, not reused)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from agfsync_jax import base_model
from agfsync_jax.models import loading
from agfsync_jax.tiny import build as tiny_build, pretrain as tiny_pretrain
from configs import tiny as tiny_config


def _high_frequency_share(x: np.ndarray) -> float:
    """Share of the spectral energy above half the Nyquist frequency, averaged over the batch."""
    power = np.abs(np.fft.fft2(x)) ** 2
    f = np.abs(np.fft.fftfreq(x.shape[-1]))
    high = (f[:, None] > 0.25) | (f[None, :] > 0.25)
    return float((power[..., high].sum(-1) / power.reshape(power.shape[:-2] + (-1,)).sum(-1)).mean())


def test_synthetic_latents_have_unit_std_and_get_smoother_with_sigma():
    rng = np.random.default_rng(0)
    x, sigmas = tiny_pretrain.synthetic_latents(rng, 24, (4, 16, 16))
    assert x.shape == (24, 4, 16, 16) and x.dtype == np.float32
    assert set(sigmas) <= set(tiny_pretrain.BLUR_SIGMAS)
    np.testing.assert_allclose(x.reshape(24, -1).std(axis=1), 1.0, rtol=1e-5)
    shares = [_high_frequency_share(tiny_pretrain.synthetic_latents(np.random.default_rng(1), 8, (4, 16, 16),
                                                                    sigmas=(s,))[0]) for s in (0.0, 1.0, 2.0)]
    # White noise spreads its energy evenly: 7 of the 16 frequencies per axis are above half
    # Nyquist, so 1 - (9/16)^2 of the 2-D spectrum is high in at least one axis.
    assert shares[0] == pytest.approx(1 - (9 / 16) ** 2, abs=0.03)
    assert shares[0] > 10 * shares[1] > 10 * shares[2] > 0
    again, _ = tiny_pretrain.synthetic_latents(np.random.default_rng(0), 24, (4, 16, 16))
    np.testing.assert_array_equal(x, again)


def test_random_captions_are_reproducible_text():
    a = tiny_pretrain.random_captions(np.random.default_rng(3), 5)
    assert a == tiny_pretrain.random_captions(np.random.default_rng(3), 5)
    assert all(1 <= len(c.split()) <= 12 and c.replace(" ", "").isalpha() for c in a)


@pytest.mark.slow
def test_pretraining_lowers_the_denoising_loss(tiny_sd1):
    params, losses = tiny_pretrain.pretrain_unet(tiny_sd1, steps=40, batch_size=16, learning_rate=1e-3, seed=0)
    # Random weights: about 1.15 at the first step (measured); after 40 steps the loss is well below.
    print("pretraining losses", [round(x, 3) for x in losses])
    assert losses[0] > 0.9
    assert np.mean(losses[-5:]) < 0.7 * losses[0]
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   params, tiny_sd1.unet.params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.slow
def test_pretraining_runs_for_sdxl_and_is_deterministic(tiny_sdxl):
    a, losses_a = tiny_pretrain.pretrain_unet(tiny_sdxl, steps=2, batch_size=4, learning_rate=1e-3, seed=5)
    b, losses_b = tiny_pretrain.pretrain_unet(tiny_sdxl, steps=2, batch_size=4, learning_rate=1e-3, seed=5)
    assert np.all(np.isfinite(losses_a)) and losses_a == losses_b
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_bad_settings_are_refused(tiny_sd1):
    with pytest.raises(ValueError, match="steps > 0"):
        tiny_pretrain.pretrain_unet(tiny_sd1, steps=0, batch_size=4, learning_rate=1e-3, seed=0)


def _config(steps: int):
    c = tiny_config.get_config()
    c.model.tiny_pretrain_steps = steps
    c.model.tiny_pretrain_batch_size = 4
    return c


@pytest.mark.slow
def test_base_model_is_pretrained_recorded_and_a_stale_cache_refused(tmp_path, tiny_sd1):
    path = base_model.resolve_base_model(_config(3), tmp_path)
    record = json.loads((path / tiny_build.BUILD_RECORD).read_text())
    assert record["pretrain_steps"] == 3 and record["pretrain_batch_size"] == 4
    sd = loading.load_stable_diffusion(path)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   sd.unet.params, tiny_sd1.unet.params)
    assert max(jax.tree_util.tree_leaves(diffs)) > 0  # not the random UNet (same seed)
    assert base_model.resolve_base_model(_config(3), tmp_path) == path  # cached: same settings
    with pytest.raises(ValueError, match=r"pretrain_steps=3 .*asks for 5.*remove"):
        base_model.resolve_base_model(_config(5), tmp_path)
    changed = _config(3)
    changed.model.tiny_pretrain_learning_rate = 1e-4
    with pytest.raises(ValueError, match="pretrain_learning_rate"):
        base_model.resolve_base_model(changed, tmp_path)


def test_folder_without_build_record_counts_as_unpretrained(tmp_path):
    out = tmp_path / "base_model"
    tiny_build.save_tiny_pipeline("sd1", out)
    (out / tiny_build.BUILD_RECORD).unlink()  # as written before the record existed
    assert base_model.resolve_base_model(_config(0), tmp_path) == out
    with pytest.raises(ValueError, match=f"no {tiny_build.BUILD_RECORD}"):
        base_model.resolve_base_model(_config(3), tmp_path)
