"""The Flax VAE encoder: pixels in [-1, 1] -> UNet-space latents. Pure and jittable.

    latents = encode_latents(vae.module, vae.params, vae.config, pixels, key_data, mode="sample")

`FlaxAutoencoderKL.encode` gives the diagonal Gaussian posterior (channels-last); its mean and
standard deviation are moved to (B, C, h, w) here. The UNet-space latent is

    z = mean                     (mode "mean": the posterior's mode, deterministic)
    z = mean + std * N(0, I)     (mode "sample": `latent_dist.sample()` of diffusers' DPO and SFT
                                  training scripts, with one key per image)

times `scaling_factor`, or, for a VAE that declares per-channel `latents_mean`/`latents_std`,
(z - latents_mean) / latents_std * scaling_factor: the inverse of `sampling.decode.vae_input`,
so that decoding an encoded image goes back through the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LATENT_MODES = ("sample", "mean")
# Pinned like sampling.noise: another `jax_default_prng_impl` must not change a seed's draws.
PRNG_IMPL = "threefry2x32"


def posterior(vae_module: Any, vae_params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, 3, H, W) pixels in [-1, 1] -> the posterior's (mean, std), each (B, C, h, w) float32."""
    dist = vae_module.apply({"params": vae_params}, pixels, method=vae_module.encode).latent_dist
    to_nchw = lambda x: jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2))  # noqa: E731
    return to_nchw(dist.mean), to_nchw(dist.std)


def to_unet_space(z: jax.Array, vae_config: Mapping[str, Any]) -> jax.Array:
    """VAE latents -> what the UNet trains on (the inverse of `sampling.decode.vae_input`)."""
    scale = float(vae_config["scaling_factor"])
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        return ((z - jnp.asarray(np.reshape(mean, shape), z.dtype)) * scale
                / jnp.asarray(np.reshape(std, shape), z.dtype))
    return z * scale


def encode_latents(vae_module: Any, vae_params: Any, vae_config: Mapping[str, Any], pixels: jax.Array,
                   key_data: jax.Array, mode: str) -> jax.Array:
    """(B, 3, H, W) pixels -> (B, C, h, w) float32 UNet-space latents.

    Args:
        key_data: (B, 2) uint32 threefry key data, one key per image (read in mode "sample"
            only), so an image's draw never depends on its batch or position.
        mode: "sample" or "mean" (module docstring).
    """
    if mode not in LATENT_MODES:
        raise ValueError(f"encode.latent={mode!r}, expected one of {LATENT_MODES}")
    mean, std = posterior(vae_module, vae_params, pixels)
    z = mean
    if mode == "sample":
        keys = jax.random.wrap_key_data(key_data, impl=PRNG_IMPL)
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
        z = mean + std * eps
    return to_unet_space(z, vae_config)
