"""Shared inputs for tests that run the tiny UNets through `make_denoiser`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from agfsync_jax.models.denoiser import Conditioning


def _unet_inputs(sd):
    """(x_t, t, conditioning, regression target) for a batch of 2 at the tiny 16 x 16 latents."""
    unet = sd.unet
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    b, size = 2, 16
    x = jax.random.normal(keys[0], (b, 4, size, size))
    t = jnp.array([10, 700])
    cond = Conditioning(jax.random.normal(keys[1], (b, 77, unet.config["cross_attention_dim"])))
    if sd.family == "sdxl":
        pooled = (unet.config["projection_class_embeddings_input_dim"]
                  - 6 * unet.config["addition_time_embed_dim"])
        cond = Conditioning(cond.embeds, jax.random.normal(keys[2], (b, pooled)),
                            jnp.tile(jnp.array([[32.0, 32, 0, 0, 32, 32]]), (b, 1)))
    return x, t, cond, jax.random.normal(keys[3], x.shape)


@pytest.fixture(scope="session")
def unet_inputs():
    """A function: tiny StableDiffusion -> (x_t, t, conditioning, target)."""
    return _unet_inputs
