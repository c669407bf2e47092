"""Pretraining the tiny UNet into a denoiser, so that the tiny demo has something to align.

A randomly initialised UNet is not a model of any image distribution: its samples are whatever
its random weights and the initial noise make of each other, the candidates of a prompt differ
only through their initial noise, and no weight change moves them all the same way. Diffusion-DPO
then fits its training pairs and the finetuned model is no better on new samples (measured in
docs/tiny_closed_loop.md: win rates 0.33-0.63 on 24 prompts, 0.44-0.46 on 96). Pretrained for
300 steps, the same demo wins 70 of 96 prompts (sign test p = 4e-6).

Here the tiny UNet is trained with the ordinary epsilon-prediction loss on synthetic latents that
vary in one factor, smoothness: white noise blurred by a periodic Gaussian of a random width
(`BLUR_SIGMAS`, in latent pixels) and rescaled to unit standard deviation. The text conditioning
is a random caption (random letters, so no benchmark or demo prompt is seen) or the model's
unconditional embedding, so the UNet learns to ignore the text. Sampled, it produces latents of
the three kinds depending on the initial noise; the VAE decodes them into images that differ
in texture, which the tiny scorers rank and a UNet's weights can shift. The VAE and text encoders
stay random.

Deterministic given the seed on one machine; 3.3 minutes on two CPU cores for 300 steps of 64.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from agfsync_jax.models.denoiser import Conditioning, make_denoiser
from agfsync_jax.models.loading import StableDiffusion
from agfsync_jax.models.text_encoding import sdxl_time_ids
from agfsync_jax.tiny.pipeline import TINY_RESOLUTION
from agfsync_jax.training import noise as noise_lib

BLUR_SIGMAS = (0.0, 1.0, 2.0)
NUM_CAPTIONS = 256


def gaussian_blur_transfer(size: int, sigma: float) -> np.ndarray:
    """The (size, size) frequency response of a periodic Gaussian blur of width sigma (pixels)."""
    f = np.fft.fftfreq(size)
    return np.exp(-2.0 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))


def synthetic_latents(rng: np.random.Generator, batch: int, shape: Sequence[int],
                      sigmas: Sequence[float] = BLUR_SIGMAS) -> tuple[np.ndarray, np.ndarray]:
    """(batch, C, H, W) unit-std float32 latents, each blurred by a random one of `sigmas`; and the sigmas."""
    c, h, w = shape
    if h != w:
        raise ValueError(f"square latents expected, got {h} x {w}")
    white = rng.standard_normal((batch, c, h, w))
    chosen = rng.choice(np.asarray(sigmas, np.float64), size=batch)
    out = np.empty_like(white)
    for i, sigma in enumerate(chosen):
        blurred = np.real(np.fft.ifft2(np.fft.fft2(white[i]) * gaussian_blur_transfer(h, sigma)))
        out[i] = blurred / blurred.std()
    return out.astype(np.float32), chosen


def random_captions(rng: np.random.Generator, n: int) -> list[str]:
    """n captions of 1-12 random lowercase 'words': text the UNet should learn to ignore."""
    letters = np.array(list(string.ascii_lowercase))
    return [" ".join("".join(rng.choice(letters, size=rng.integers(2, 9)))
                     for _ in range(rng.integers(1, 13))) for _ in range(n)]


def _conditioning_table(sd: StableDiffusion, captions: list[str]) -> Conditioning:
    """Every caption's conditioning plus the unconditional one (last row), stacked."""
    from agfsync_jax.sampling.candidates import unconditional
    from agfsync_jax.training.text import PromptEncoder

    encoded = PromptEncoder(sd, np.dtype(np.float32))(captions)
    empty = unconditional(sd)
    embeds = np.concatenate([encoded.embeds, empty.embeds], axis=0)
    pooled = None if encoded.pooled is None else np.concatenate([encoded.pooled, empty.pooled], axis=0)
    time_ids = None if pooled is None else sdxl_time_ids(TINY_RESOLUTION, embeds.shape[0])
    return Conditioning(jnp.asarray(embeds), None if pooled is None else jnp.asarray(pooled),
                        None if time_ids is None else jnp.asarray(time_ids))


def pretrain_unet(sd: StableDiffusion, *, steps: int, batch_size: int, learning_rate: float,
                  seed: int) -> tuple[Any, list[float]]:
    """The UNet parameters after `steps` AdamW steps (cosine decay) of denoising synthetic latents.

    Returns the parameters (host arrays) and the loss of every step.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"tiny pretraining needs steps > 0 and batch_size > 0, got {steps}, {batch_size}")
    if not sd.text_encoders:
        raise ValueError(f"{sd.path}: tiny pretraining needs the text encoders")
    rng = np.random.default_rng(seed)
    table = _conditioning_table(sd, random_captions(rng, NUM_CAPTIONS))
    schedule = noise_lib.schedule_from_config(sd.scheduler_config)
    denoiser = make_denoiser(sd.unet.module)
    module = sd.unet.module
    shape = (module.in_channels, module.sample_size, module.sample_size)
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=0.0)

    def pick(table_leaf: jax.Array | None, rows: jax.Array) -> jax.Array | None:
        return None if table_leaf is None else table_leaf[rows]

    @jax.jit
    def step(params: Any, opt_state: Any, x0: jax.Array, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        k_t, k_n, k_c = jax.random.split(key, 3)
        t = noise_lib.sample_timesteps(k_t, schedule, (x0.shape[0],))
        eps = jax.random.normal(k_n, x0.shape, x0.dtype)
        rows = jax.random.randint(k_c, (x0.shape[0],), 0, table.embeds.shape[0])
        cond = Conditioning(table.embeds[rows], pick(table.pooled, rows), pick(table.time_ids, rows))

        def loss_fn(p: Any) -> jax.Array:
            pred = denoiser(p, noise_lib.add_noise(schedule, x0, eps, t), t, cond)
            return jnp.mean(jnp.square(pred - noise_lib.regression_target(schedule, x0, eps, t)))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree_util.tree_map(jnp.asarray, sd.unet.params)
    opt_state = tx.init(params)
    key = jax.random.PRNGKey(seed)
    losses: list[jax.Array] = []
    for i in tqdm(range(steps), desc="tiny pretrain", unit="step"):
        x0, _ = synthetic_latents(rng, batch_size, shape)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x0), jax.random.fold_in(key, i))
        losses.append(loss)
    return jax.device_get(params), [float(x) for x in jax.device_get(losses)]
