"""The training objective as a pure function of the UNet parameters.

    loss, metrics = objective(params, ref_params, denoiser, spec, schedule, beta,
                              images, conds, noise, timesteps)

Noise and timesteps are arguments, so the same call can be checked against an independent
PyTorch computation. All views of a loss (see `losses.LossSpec`) go through the UNet as one
batch: one policy forward, and one reference forward for winners and losers together, outside
the gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from agfsync_jax.models.denoiser import Conditioning, Denoiser
from agfsync_jax.training import losses, noise as noise_lib


def _stack_views(spec: losses.LossSpec, images: Mapping[str, jax.Array],
                 conds: Sequence[Conditioning]) -> tuple[jax.Array, Conditioning]:
    x0 = jnp.stack([images[image] for image, _ in spec.views])  # (V, B, C, H, W)
    view_conds = [conds[slot] for _, slot in spec.views]
    cond = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *view_conds)
    return x0, cond


def objective(params: Any, ref_params: Any, denoiser: Denoiser, spec: losses.LossSpec,
              schedule: noise_lib.NoiseSchedule, beta: float, images: Mapping[str, jax.Array],
              conds: Sequence[Conditioning], noise: jax.Array,
              timesteps: jax.Array) -> tuple[jax.Array, losses.Metrics]:
    """The loss of `spec` for one batch of pairs.

    images: {"winner": (B, C, H, W), "loser": ...} clean latents x_0.
    conds: one Conditioning per prompt slot (prompt, prompt_2), each with batch B.
    noise: (spec.num_noise, B, C, H, W); timesteps: (B,) int, shared by all views of a pair.
    """
    x0, cond = _stack_views(spec, images, conds)
    num_views, batch = x0.shape[:2]
    if noise.shape[0] != spec.num_noise:
        raise ValueError(f"loss {spec.name!r} needs noise of leading size {spec.num_noise}, "
                         f"got shape {noise.shape}")
    noise = jnp.broadcast_to(noise, x0.shape)
    t = jnp.broadcast_to(timesteps, (num_views, batch))
    x_t = noise_lib.add_noise(schedule, x0, noise, t)
    target = noise_lib.regression_target(schedule, x0, noise, t)

    def flat(a: jax.Array) -> jax.Array:
        return a.reshape((num_views * batch,) + a.shape[2:])

    def unflat(a: jax.Array) -> jax.Array:
        return a.reshape((num_views, batch) + a.shape[1:])

    policy_pred = unflat(denoiser(params, flat(x_t), flat(t), cond))
    ref_pred = None
    if spec.uses_reference:
        ref_pred = jax.lax.stop_gradient(
            unflat(denoiser(jax.lax.stop_gradient(ref_params), flat(x_t), flat(t), cond)))
    return spec.fn(policy_pred, ref_pred, target, beta)
