"""The pure denoising core: initial latents + text conditioning -> final latents.

    eps_fn = flax_unet(sd.unet.module)
    x0 = denoise(eps_fn, sd.unet.params, scheduler, latents, cond, uncond, guidance_scale=7.5)

Everything is explicit: the initial latents (unit Gaussians), the conditional and unconditional
text conditioning, the guidance scale and the scheduler. No randomness, no host round trips; the
whole loop is one `lax.fori_loop`, so under `jax.jit` it compiles once per (batch shape,
scheduler, steps). It mirrors diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline`
with `latents=`, `prompt_embeds=`, `negative_prompt_embeds=` and `output_type="latent"`:

* the given latents are multiplied by `scheduler.init_noise_sigma`;
* classifier-free guidance runs the unconditional and conditional branches in one UNet call
  and combines them as `uncond + g * (cond - uncond)`;
* without an unconditional branch (`uncond=None`, what the pipelines do for g <= 1) the UNet
  sees only the conditional branch.

The two branches of an example sit next to each other in the UNet batch (u0, c0, u1, c1, ...)
rather than as two halves (u0, u1, ..., c0, c1, ...) as in diffusers. UNet rows are
independent, so the result is the same, but with the batch sharded over devices the pairs stay
on the device that holds the example instead of being exchanged between devices at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from agfsync_jax.sampling.schedulers import Scheduler

# eps_fn(unet_params, latents (N, C, H, W), timestep (), context (N, L, D), added_cond | None) -> (N, C, H, W)
EpsFn = Callable[[Any, jax.Array, jax.Array, jax.Array, dict[str, jax.Array] | None], jax.Array]


class Conditioning(NamedTuple):
    """Text conditioning of a batch. `pooled` and `time_ids` are SDXL's added conditions."""

    embeds: jax.Array  # (B, L, D) cross-attention context
    pooled: jax.Array | None = None  # (B, P) pooled text embedding of the second encoder
    time_ids: jax.Array | None = None  # (B, 6) original size, crop offset, target size


def flax_unet(module: Any, interceptor: Callable[..., Any] | None = None) -> EpsFn:
    """The model-output function of a diffusers Flax UNet, in float32.

    `interceptor` is a flax method interceptor applied around the UNet, e.g. another attention
    kernel (`agfsync_jax.models.attention.interceptor_for`, from `sampling.attention`).
    """
    def eps_fn(params, latents, timestep, context, added_cond):
        with nn.intercept_methods(interceptor) if interceptor is not None else contextlib.nullcontext():
            out = module.apply({"params": params}, latents, timestep, context, added_cond_kwargs=added_cond).sample
        return out.astype(jnp.float32)
    return eps_fn


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, ...) and (B, ...) -> (2B, ...) ordered a0, b0, a1, b1, ..."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _added_cond(cond: Conditioning) -> dict[str, jax.Array] | None:
    if cond.pooled is None:
        return None
    return {"text_embeds": cond.pooled, "time_ids": cond.time_ids}


def guided_model_input(cond: Conditioning, uncond: Conditioning | None) -> tuple[jax.Array, dict | None]:
    """The UNet's context and added conditions for one guided call (branches interleaved)."""
    if uncond is None:
        return cond.embeds, _added_cond(cond)
    context = _interleave(uncond.embeds, cond.embeds)
    if cond.pooled is None:
        return context, None
    return context, {"text_embeds": _interleave(uncond.pooled, cond.pooled),
                     "time_ids": _interleave(uncond.time_ids, cond.time_ids)}


def denoise(eps_fn: EpsFn, unet_params: Any, scheduler: Scheduler, latents: jax.Array, cond: Conditioning,
            uncond: Conditioning | None, guidance_scale: jax.Array | float) -> jax.Array:
    """Runs the sampler; returns the final latents in UNet space (what the VAE decodes after
    dividing by its scaling factor).

    Args:
        eps_fn: the UNet as a function (see `flax_unet`).
        unet_params: its parameters (traced, so they may be sharded).
        scheduler: a `Scheduler` set up for the number of steps (static).
        latents: (B, C, H, W) unit Gaussian initial latents.
        cond: conditional text conditioning, batch B. SDXL needs `pooled` and `time_ids`.
        uncond: unconditional conditioning, batch B, or None for no classifier-free guidance.
        guidance_scale: scalar, traced; ignored when `uncond` is None.
    """
    if (cond.pooled is None) != (cond.time_ids is None):
        raise ValueError("SDXL conditioning needs both `pooled` and `time_ids` (or neither for SD1.x)")
    if uncond is not None and (uncond.pooled is None) != (cond.pooled is None):
        raise ValueError("cond and uncond must both carry SDXL's pooled embeddings, or neither")
    context, added = guided_model_input(cond, uncond)
    guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
    x = latents.astype(jnp.float32) * scheduler.init_noise_sigma
    state = scheduler.init_state(x.shape)

    def body(i, carry):
        x, state = carry
        x_in = scheduler.scale_model_input(state, x, i)
        t = scheduler.timestep(i)
        if uncond is None:
            eps = eps_fn(unet_params, x_in, t, context, added)
        else:
            eps_pairs = eps_fn(unet_params, _interleave(x_in, x_in), t, context, added)
            eps_pairs = eps_pairs.reshape((x.shape[0], 2) + x.shape[1:])
            eps_uncond, eps_cond = eps_pairs[:, 0], eps_pairs[:, 1]
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return scheduler.step(state, eps, i, x)

    x, _ = jax.lax.fori_loop(0, scheduler.num_model_calls, body, (x, state))
    return x
