"""Final latents (UNet space) -> uint8 RGB images, as diffusers' pipelines post-process them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def vae_input(latents: jax.Array, vae_config: Mapping[str, Any]) -> jax.Array:
    """UNet-space latents -> the VAE decoder's input.

    SD1.x/SDXL divide by `scaling_factor`; VAEs that declare per-channel `latents_mean` and
    `latents_std` un-normalise with them instead (the SDXL pipeline's rule).
    """
    scale = float(vae_config["scaling_factor"])
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        return (latents * jnp.asarray(np.reshape(std, shape), latents.dtype) / scale
                + jnp.asarray(np.reshape(mean, shape), latents.dtype))
    return latents / scale


def decode_to_uint8(vae_module: Any, vae_params: Any, vae_config: Mapping[str, Any],
                    latents: jax.Array) -> jax.Array:
    """(B, C, h, w) UNet-space latents -> (B, H, W, 3) uint8, rounded like diffusers' `numpy_to_pil`."""
    z = vae_input(latents.astype(jnp.float32), vae_config)
    images = vae_module.apply({"params": vae_params}, z, method=vae_module.decode).sample
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(images * 255).astype(jnp.uint8).transpose(0, 2, 3, 1)
