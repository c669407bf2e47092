"""Sample images of fixed prompts and seeds from the UNet being trained (validation's grid).

    grid = SampleGrid(sd, prompts, images_per_prompt=2, seed=0, steps=10, scheduler="ddim",
                      guidance_scale=7.5, resolution=32, mesh=mesh, unet_shardings=..., vae_shardings=...)
    images = grid(state.params)           # (len(prompts) * images_per_prompt, H, W, 3) uint8

Everything but the UNet parameters is fixed when the grid is built: prompt embeddings, the
unconditional branch, and the initial latents (one key per (prompt, image) from `seed`), so the
grid of one step is comparable with the grid of any other. The denoising core and the decoder
are the sampling stage's (sampling/denoise.py, sampling/decode.py); the batch is padded to a
multiple of the device count and sharded over the mesh, the images come back replicated. The
prompts are encoded by a PromptEncoder of its own, so validation never touches the cache that
training's cached text encodings read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from agfsync_jax import sharding
from agfsync_jax.models.loading import FAMILY_SDXL, StableDiffusion
from agfsync_jax.models.text_encoding import sdxl_time_ids
from agfsync_jax.sampling import candidate_seeds, candidates, decode, noise
from agfsync_jax.models.denoiser import Conditioning, make_denoiser
from agfsync_jax.sampling.denoise import denoise
from agfsync_jax.sampling.schedulers import make_scheduler, resolve_name
from agfsync_jax.training.text import PromptEncoder


def latent_key_data(seed: int, prompt_index: int, image: int,
                    stream: str = candidate_seeds.LATENTS) -> np.ndarray:
    """Key data of the initial latents (or another stream, e.g. the step noise) of image `image`
    of validation prompt `prompt_index`."""
    return candidate_seeds.key_data(candidate_seeds.stream_seed(
        candidate_seeds.candidate_seed(seed, f"validation/{prompt_index}", 0, image), stream))


class SampleGrid:
    """The validation prompts x seeds, sampled with the parameters passed to each call."""

    def __init__(self, sd: StableDiffusion, prompts: Sequence[str], *, images_per_prompt: int, seed: int,
                 steps: int, scheduler: str, guidance_scale: float, resolution: int, mesh: Mesh,
                 unet_shardings: Any, vae_shardings: Any, eta: float = 0.0):
        if sd.vae is None:
            raise ValueError(f"{sd.path}: the validation grid needs the VAE loaded")
        if not prompts or images_per_prompt < 1 or steps < 1:
            raise ValueError(f"train.val_prompts ({len(prompts)}), train.val_images_per_prompt ({images_per_prompt}) "
                             f"and train.val_sample_steps ({steps}) must all be >= 1")
        self.num_images = len(prompts) * images_per_prompt
        self.columns = images_per_prompt
        padded = math.ceil(self.num_images / mesh.size) * mesh.size
        texts = [p for p in prompts for _ in range(images_per_prompt)]
        texts += [""] * (padded - len(texts))
        keys = np.zeros((padded, 2), np.uint32)
        step_keys = np.zeros((padded, 2), np.uint32)
        for i in range(self.num_images):
            keys[i] = latent_key_data(seed, i // images_per_prompt, i % images_per_prompt)
            step_keys[i] = latent_key_data(seed, i // images_per_prompt, i % images_per_prompt,
                                           candidate_seeds.STEP_NOISE)
        shape = candidates.latent_shape(sd.unet.config, sd.vae.config, resolution, f"({sd.path})")
        latents = np.asarray(jax.jit(noise.initial_latents, static_argnums=1)(keys, shape))

        encoded = PromptEncoder(sd, np.dtype(np.float32))(texts)
        time_ids = sdxl_time_ids(resolution, padded) if sd.family == FAMILY_SDXL else None
        cond = Conditioning(encoded.embeds, encoded.pooled, time_ids)
        negative = None
        if guidance_scale > 1.0:  # diffusers' rule for classifier-free guidance
            empty = candidates.unconditional(sd)
            negative = Conditioning(np.broadcast_to(empty.embeds, cond.embeds.shape).copy(),
                                    None if empty.pooled is None
                                    else np.broadcast_to(empty.pooled, encoded.pooled.shape).copy(), time_ids)
        batch = sharding.batch_sharding(mesh)
        self._inputs = sharding.place_tree((latents, cond, negative),
                                           jax.tree_util.tree_map(lambda _: batch, (latents, cond, negative)))
        self._vae_params = sharding.place_tree(sd.vae.params, vae_shardings)
        denoise_fn = make_denoiser(sd.unet.module)
        # sampling.scheduler "" is the folder's class, as in the sample stage.
        name = resolve_name(scheduler, sd.scheduler_config, f"{sd.path}/scheduler/scheduler_config.json")
        sampler = make_scheduler(name, sd.scheduler_config, steps, eta=eta)
        vae_module, vae_config = sd.vae.module, dict(sd.vae.config)
        step_noise = None
        if sampler.needs_step_noise:  # LCM, DDIM with eta > 0: fixed per image, like the latents
            step_noise = functools.partial(noise.step_noise, step_keys, latent_shape=shape)

        def sample(unet_params, vae_params, inputs):
            latents, cond, negative = inputs
            final = denoise(denoise_fn, unet_params, sampler, latents, cond, negative, guidance_scale, step_noise)
            return decode.decode_to_uint8(vae_module, vae_params, vae_config, final)

        self._sample = jax.jit(sample, in_shardings=(unet_shardings, vae_shardings, batch),
                               out_shardings=sharding.replicated(mesh))

    def __call__(self, unet_params: Any) -> np.ndarray:
        """(num_images, H, W, 3) uint8, prompt-major; the same on every process."""
        images = self._sample(unet_params, self._vae_params, self._inputs)
        return np.asarray(jax.device_get(images))[:self.num_images]
