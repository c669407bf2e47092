"""The training objective as a pure function of the UNet parameters.

    loss, metrics = objective(params, ref_params, denoiser, spec, schedule, beta,
                              images, conds, noise, timesteps)

Noise and timesteps are arguments, so the same call can be checked against an independent
PyTorch computation. All views of a loss (see `losses.LossSpec`) go through the UNet as one
batch: one policy forward, and one reference forward for winners and losers together, outside
the gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from agfsync_jax.models import attention as attention_lib, remat as remat_lib
from agfsync_jax.training import losses, noise as noise_lib

Denoiser = Callable[[Any, jax.Array, jax.Array, "Conditioning"], jax.Array]


@flax.struct.dataclass
class Conditioning:
    """What the UNet is conditioned on, per example."""

    embeds: jax.Array  # (B, L, D) cross-attention context
    pooled: jax.Array | None = None  # (B, P) SDXL pooled text embedding
    time_ids: jax.Array | None = None  # (B, 6) SDXL size/crop micro-conditioning


ATTENTION_KINDS = attention_lib.ATTENTION_KINDS


def make_denoiser(unet_module: Any, remat_policy: str = "", attention: str = "diffusers",
                  remat_scope: str = "layers", mesh: Mesh | None = None) -> Denoiser:
    """(params, x_t, t, cond) -> prediction (float32 or wider), with optional rematerialisation.

    `attention` is one of `agfsync_jax.models.attention.ATTENTION_KINDS`: "diffusers" (the Flax
    UNet's own attention), "fused" (the same math with a flash-style backward that keeps no
    N x N probabilities for the backward pass), "dot_product" (`jax.nn.dot_product_attention`,
    cuDNN on GPU) or "flash" (the platform's fused kernel: Pallas flash attention on TPU). The
    platform is that of `mesh`'s devices (JAX's default backend without one).

    `remat_policy` names a `jax.checkpoint_policies` member; the UNet's activations are then
    recomputed in the backward pass except for what the policy saves (empty: no remat).
    `remat_scope` says what is checkpointed: "layers" (default: every resnet and transformer
    separately, as diffusers' PyTorch gradient checkpointing does; `agfsync_jax.models.remat`),
    "blocks" (every down, mid and up block), or "unet" (the whole forward as one checkpoint,
    recomputed in full before the backward: +18% FLOPs against +11% for "layers" on SD1.5).
    """
    attention_interceptor = attention_lib.interceptor_for(attention, mesh)
    if remat_scope not in remat_lib.SCOPES:
        raise ValueError(f"train.remat_scope={remat_scope!r}; expected one of {remat_lib.SCOPES}")
    policy = None
    if remat_policy:
        policy = getattr(jax.checkpoint_policies, remat_policy, None)
        if policy is None or not callable(policy):
            raise ValueError(f"train.remat_policy={remat_policy!r} is not a jax.checkpoint_policies member")
    per_module = bool(remat_policy) and remat_scope != "unet"

    def apply(params: Any, x_t: jax.Array, t: jax.Array, cond: Conditioning) -> jax.Array:
        added = None
        if cond.pooled is not None:
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        with contextlib.ExitStack() as stack:
            if attention_interceptor is not None:
                stack.enter_context(nn.intercept_methods(attention_interceptor))
            if per_module:
                stack.enter_context(nn.intercept_methods(remat_lib.interceptor(policy, remat_scope)))
            out = unet_module.apply({"params": params}, x_t, t, cond.embeds,
                                    added_cond_kwargs=added, train=False)
        # Scored in float32 even under bf16 compute (float64 stays float64, for tests).
        return out.sample.astype(jnp.promote_types(out.sample.dtype, jnp.float32))

    if policy is None or per_module:
        return apply
    return jax.checkpoint(apply, policy=policy)


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
