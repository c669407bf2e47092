"""The validation grid is the sampling stage's generation (same prompts, seeds, scheduler and
guidance), with the parameters passed in: comparable across steps, different for other weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from agfsync_jax import sharding
from agfsync_jax.models.text_encoding import tokenize
from agfsync_jax.sampling import candidate_seeds, candidates
from agfsync_jax.sampling.schedulers import make_scheduler
from agfsync_jax.training.validation_samples import SampleGrid, latent_key_data
from configs import common

PROMPTS = ("a red cat", "a blue house")

pytestmark = pytest.mark.slow  # three sampler compilations: about a minute on 2 CPU cores


# LCM at guidance 1 injects step noise between steps, drawn per image like the latents.
@pytest.mark.parametrize("scheduler,guidance", [("ddim", 7.5), ("lcm", 1.0)])
def test_grid_equals_the_sampling_stage_and_follows_the_parameters(tiny_sd1, scheduler, guidance):
    mesh = sharding.make_mesh(common.base_config().mesh, jax.devices()[:1])
    replicate = lambda tree: jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), tree)  # noqa: E731
    grid = SampleGrid(tiny_sd1, PROMPTS, images_per_prompt=2, seed=5, steps=4, scheduler=scheduler,
                      guidance_scale=guidance, resolution=32, mesh=mesh, unet_shardings=replicate(tiny_sd1.unet.params),
                      vae_shardings=replicate(tiny_sd1.vae.params))
    images = grid(tiny_sd1.unet.params)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(grid(tiny_sd1.unet.params), images)  # fixed inputs: the same grid

    # The sampling stage's generate() on the same prompts and latent keys, clean embeddings.
    models = candidates.candidate_models(tiny_sd1, make_scheduler(scheduler, tiny_sd1.scheduler_config, 4), 32,
                                         guidance, True)
    texts = [p for p in PROMPTS for _ in range(2)]
    batch = {"token_ids": np.swapaxes(tokenize(tiny_sd1.tokenizers, texts), 0, 1),
             "latent_keys": np.stack([latent_key_data(5, i // 2, i % 2) for i in range(4)]),
             "step_noise_keys": np.stack([latent_key_data(5, i // 2, i % 2, candidate_seeds.STEP_NOISE)
                                          for i in range(4)]),
             "noise_keys": np.zeros((4, 2), np.uint32), "embeds_sigma": np.zeros(4, np.float32),
             "pooled_sigma": np.zeros(4, np.float32)}
    uncond = candidates.unconditional(tiny_sd1)
    reference = jax.jit(lambda params, batch: candidates.generate(models, params, batch, uncond, guidance))(
        candidates.model_params(tiny_sd1, True), batch)["images"]
    diff = np.abs(images.astype(int) - np.asarray(reference).astype(int))
    print("max |grid - generate| in uint8 levels:", diff.max())
    assert diff.max() <= 1  # rounding of the float32 image at the uint8 boundary
    assert images[0].std() > 0 and not np.array_equal(images[0], images[1])  # two seeds, two images

    other = jax.tree_util.tree_map(lambda x: x * 1.05, tiny_sd1.unet.params)
    assert not np.array_equal(grid(other), images)
