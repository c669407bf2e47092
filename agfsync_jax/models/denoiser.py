"""The UNet as a pure function of its parameters, for sampling and training alike.

    denoise_fn = make_denoiser(sd.unet.module, remat_policy="", attention="diffusers")
    prediction = denoise_fn(params, x_t, t, Conditioning(embeds, pooled, time_ids))

`Conditioning` is what the UNet is conditioned on; the sampler, the train step and the tiny
pretraining all build one and call the same function, so SDXL's added conditions
(`added_cond_kwargs`) are assembled in exactly one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from agfsync_jax import lora
from agfsync_jax.models import attention as attention_lib, remat as remat_lib


@flax.struct.dataclass
class Conditioning:
    """Text conditioning of a batch. `pooled` and `time_ids` are SDXL's added conditions."""

    embeds: jax.Array  # (B, L, D) cross-attention context
    pooled: jax.Array | None = None  # (B, P) pooled text embedding of the second encoder
    time_ids: jax.Array | None = None  # (B, 6) original size, crop offset, target size

    def added_cond_kwargs(self) -> dict[str, jax.Array] | None:
        """The Flax UNet's `added_cond_kwargs` (SDXL), or None (SD1.x)."""
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


# (params, x_t (B, C, H, W), t () or (B,), cond) -> model output (B, C, H, W), float32 or wider.
Denoiser = Callable[[Any, jax.Array, jax.Array, Conditioning], jax.Array]

ATTENTION_KINDS = attention_lib.ATTENTION_KINDS


def make_denoiser(unet_module: Any, remat_policy: str = "", attention: str = "diffusers",
                  remat_scope: str = "layers", lora_scale: float | None = None,
                  mesh: Mesh | None = None, attention_field: str = "train.attention") -> Denoiser:
    """(params, x_t, t, cond) -> prediction (float32 or wider), with optional rematerialisation.

    `params` is the UNet's parameter tree, or `lora.WithAdapters(base, adapters)` for a LoRA
    policy, whose adapters then act with `lora_scale` (alpha / rank); the base tree alone runs
    the UNet with adapters off (the LoRA run's reference).

    `attention` is one of `agfsync_jax.models.attention.ATTENTION_KINDS`: "diffusers" (the Flax
    UNet's own attention), "fused" (the same math with a flash-style backward that keeps no
    N x N probabilities for the backward pass), "dot_product" (`jax.nn.dot_product_attention`,
    cuDNN on GPU) or "flash" (the platform's fused kernel: Pallas flash attention on TPU). The
    platform is that of `mesh`'s devices (JAX's default backend without one); `attention_field`
    names the config field in errors.

    `remat_policy` names a `jax.checkpoint_policies` member; the UNet's activations are then
    recomputed in the backward pass except for what the policy saves (empty: no remat).
    `remat_scope` says what is checkpointed: "layers" (default: every resnet and transformer
    separately, as diffusers' PyTorch gradient checkpointing does; `agfsync_jax.models.remat`),
    "blocks" (every down, mid and up block), or "unet" (the whole forward as one checkpoint,
    recomputed in full before the backward; docs/performance.md compares the three).
    """
    attention_interceptor = attention_lib.interceptor_for(attention, mesh, field=attention_field)
    if remat_scope not in remat_lib.SCOPES:
        raise ValueError(f"train.remat_scope={remat_scope!r}; expected one of {remat_lib.SCOPES}")
    policy = None
    if remat_policy:
        policy = getattr(jax.checkpoint_policies, remat_policy, None)
        if policy is None or not callable(policy):
            raise ValueError(f"train.remat_policy={remat_policy!r} is not a jax.checkpoint_policies member")
    per_module = bool(remat_policy) and remat_scope != "unet"

    def apply(params: Any, x_t: jax.Array, t: jax.Array, cond: Conditioning) -> jax.Array:
        with contextlib.ExitStack() as stack:
            if lora_scale is not None:
                stack.enter_context(nn.intercept_methods(lora.interceptor(lora_scale)))
            if attention_interceptor is not None:
                stack.enter_context(nn.intercept_methods(attention_interceptor))
            if per_module:
                stack.enter_context(nn.intercept_methods(remat_lib.interceptor(policy, remat_scope)))
            out = unet_module.apply(lora.variables(params), x_t, t, cond.embeds,
                                    added_cond_kwargs=cond.added_cond_kwargs(), train=False)
        # Scored in float32 even under bf16 compute (float64 stays float64, for tests).
        return out.sample.astype(jnp.promote_types(out.sample.dtype, jnp.float32))

    if policy is None or per_module:
        return apply
    return jax.checkpoint(apply, policy=policy)
