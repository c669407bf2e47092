"""The pure denoising core: initial latents + text conditioning -> final latents.

    x0 = denoise(make_denoiser(sd.unet.module), sd.unet.params, scheduler, latents, cond, uncond,
                 guidance_scale=7.5)

Everything is explicit: the initial latents (unit Gaussians), the conditional and unconditional
text conditioning, the guidance scale, the scheduler and, for schedulers that inject noise
between steps (LCM, DDIM with eta > 0), a function giving each step's noise. No hidden
randomness, no host round trips; the whole loop is one `lax.fori_loop`, so under `jax.jit` it
compiles once per (batch shape, scheduler, steps). It mirrors diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline`
with `latents=`, `prompt_embeds=`, `negative_prompt_embeds=` and `output_type="latent"`:

* the given latents are multiplied by `scheduler.init_noise_sigma`;
* classifier-free guidance runs the unconditional and conditional branches in one UNet call
  and combines them as `uncond + g * (cond - uncond)`;
* without an unconditional branch (`uncond=None`, what the pipelines do for g <= 1) the UNet
  sees only the conditional branch: one call of batch B per step (LCM at guidance 1);
* the step noise is what diffusers draws with `randn_tensor` inside `scheduler.step`.

The two branches of an example sit next to each other in the UNet batch (u0, c0, u1, c1, ...)
rather than as two halves (u0, u1, ..., c0, c1, ...) as in diffusers. UNet rows are
independent, so the result is the same, but with the batch sharded over devices the pairs stay
on the device that holds the example instead of being exchanged between devices at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from agfsync_jax.models.denoiser import Conditioning, Denoiser
from agfsync_jax.sampling.schedulers import Scheduler

# step_noise(model call index ()) -> (B, C, H, W) unit Gaussians for that step
StepNoiseFn = Callable[[jax.Array], jax.Array]


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, ...) and (B, ...) -> (2B, ...) ordered a0, b0, a1, b1, ..."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def guided_model_input(cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
    """The UNet's conditioning for one guided call (branches interleaved)."""
    if uncond is None:
        return cond
    return jax.tree_util.tree_map(_interleave, uncond, cond)


def denoise(denoise_fn: Denoiser, unet_params: Any, scheduler: Scheduler, latents: jax.Array, cond: Conditioning,
            uncond: Conditioning | None, guidance_scale: jax.Array | float,
            step_noise: StepNoiseFn | None = None) -> jax.Array:
    """Runs the sampler; returns the final latents in UNet space (what the VAE decodes after
    dividing by its scaling factor).

    Args:
        denoise_fn: the UNet as a function (`agfsync_jax.models.denoiser.make_denoiser`).
        unet_params: its parameters (traced, so they may be sharded).
        scheduler: a `Scheduler` set up for the number of steps (static).
        latents: (B, C, H, W) unit Gaussian initial latents.
        cond: conditional text conditioning, batch B. SDXL needs `pooled` and `time_ids`.
        uncond: unconditional conditioning, batch B, or None for no classifier-free guidance.
        guidance_scale: scalar, traced; ignored when `uncond` is None.
        step_noise: each step's noise (see `StepNoiseFn`); required when
            `scheduler.needs_step_noise`, unused otherwise.
    """
    if (cond.pooled is None) != (cond.time_ids is None):
        raise ValueError("SDXL conditioning needs both `pooled` and `time_ids` (or neither for SD1.x)")
    if uncond is not None and (uncond.pooled is None) != (cond.pooled is None):
        raise ValueError("cond and uncond must both carry SDXL's pooled embeddings, or neither")
    if scheduler.needs_step_noise and step_noise is None:
        raise ValueError(f"scheduler {scheduler.name!r} injects noise between steps: pass `step_noise`")
    model_cond = guided_model_input(cond, uncond)
    guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
    x = latents.astype(jnp.float32) * scheduler.init_noise_sigma
    state = scheduler.init_state(x.shape)

    def body(i, carry):
        x, state = carry
        x_in = scheduler.scale_model_input(state, x, i)
        t = scheduler.timestep(i)
        if uncond is None:
            eps = denoise_fn(unet_params, x_in, t, model_cond)
        else:
            eps_pairs = denoise_fn(unet_params, _interleave(x_in, x_in), t, model_cond)
            eps_pairs = eps_pairs.reshape((x.shape[0], 2) + x.shape[1:])
            eps_uncond, eps_cond = eps_pairs[:, 0], eps_pairs[:, 1]
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        noise = step_noise(i) if scheduler.needs_step_noise else None
        return scheduler.step(state, eps, i, x, noise)

    x, _ = jax.lax.fori_loop(0, scheduler.num_model_calls, body, (x, state))
    return x
