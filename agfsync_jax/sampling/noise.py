"""Per-candidate randomness: initial latents, noise on the text conditioning, step noise.

Pure, jittable functions of per-example key data (see candidate_seeds). Every draw is made with
the example's own key (vmapped), so an example's noise never depends on its batch, its position
in the batch, or the padding around it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agfsync_jax.models.denoiser import Conditioning

# Pinned so that a different `jax_default_prng_impl` cannot change the candidates of a seed.
PRNG_IMPL = "threefry2x32"


def _keys(key_data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(key_data, impl=PRNG_IMPL)


def initial_latents(latent_key_data: jax.Array, latent_shape: tuple[int, int, int]) -> jax.Array:
    """(B, 2) uint32 key data -> (B, C, H, W) float32 unit Gaussians, one draw per example."""
    return jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(_keys(latent_key_data))


def step_noise(step_key_data: jax.Array, index: jax.Array, latent_shape: tuple[int, int, int]) -> jax.Array:
    """(B, 2) uint32 key data and a model-call index -> (B, C, H, W) unit Gaussians for that step.

    The noise that LCM and DDIM with eta > 0 inject between steps: step i of an example draws
    from its key folded with i, so it depends on neither the batch nor the number of steps.
    """
    keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(_keys(step_key_data))
    return jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys)


def perturb_conditioning(cond: Conditioning, noise_key_data: jax.Array, embeds_sigma: jax.Array,
                         pooled_sigma: jax.Array) -> Conditioning:
    """Adds sigma * N(0, I) to each example's conditional embeddings.

    Only the conditional branch is ever passed here; the unconditional branch of classifier-free
    guidance stays clean. `embeds_sigma` and `pooled_sigma` are (B,) so that, e.g., candidate 0
    can stay clean (sigma 0) in the same compiled program. SDXL's pooled embedding gets its own
    noise only with `pooled_sigma > 0` (the authors' released code adds unit-variance noise
    there, which we treat as a bug; docs/design.md section 10).
    """
    embeds_keys, pooled_keys = jnp.moveaxis(jax.vmap(jax.random.split)(_keys(noise_key_data)), 1, 0)
    embeds = cond.embeds.astype(jnp.float32)
    noise = jax.vmap(lambda k: jax.random.normal(k, embeds.shape[1:], jnp.float32))(embeds_keys)
    embeds = embeds + embeds_sigma[:, None, None] * noise
    pooled = cond.pooled
    if pooled is not None:
        pooled = pooled.astype(jnp.float32)
        pooled_noise = jax.vmap(lambda k: jax.random.normal(k, pooled.shape[1:], jnp.float32))(pooled_keys)
        pooled = pooled + pooled_sigma[:, None] * pooled_noise
    return Conditioning(embeds, pooled, cond.time_ids)
