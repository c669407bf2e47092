"""The jitted train step: one optimizer update from one global batch of pairs.

    step = make_train_step(...)
    state, metrics = step(state, frozen, batch)     # state is donated

`batch` is a dict of global arrays sharded over the batch dimension (keys below: latents of
winners and losers, token ids or cached embeddings per prompt, SDXL time ids);
`frozen` holds what the step reads but never updates: the reference UNet (same shardings as the
policy, no optimizer state), the text encoders when prompts are encoded in the step, and the
empty-prompt conditioning for prompt dropout. Under LoRA the state's parameters are the
adapters and `frozen.base_params` the base UNet: the policy is the base with adapters on, the
reference the base with adapters off (no second UNet copy). All randomness (noise, timesteps, dropout) comes
from the key in the state, so a resumed run draws exactly what an uninterrupted one would.

A step whose loss or gradient is not finite leaves parameters and optimizer state untouched and
counts itself in `state.nonfinite_steps`; the loop decides whether to go on or stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agfsync_jax import lora, sharding
from agfsync_jax.models.text_encoding import TextEmbeddings
from agfsync_jax.training import losses, noise as noise_lib
from agfsync_jax.models.denoiser import Conditioning, Denoiser
from agfsync_jax.training.objective import objective
from agfsync_jax.training.train_state import TrainState, ema_decay_at, ema_update

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (encoder params, token ids (num_encoders, B, L)) -> embeddings; pure and jittable.
TextEncodeFn = Callable[[Any, jax.Array], TextEmbeddings]

# Batch keys. Per prompt slot s (0: `prompt`, 1: `prompt_2`) a batch carries either token ids
# (text encoded in the step) or cached embeddings; suffix "" for slot 0 and "_2" for slot 1.
IMAGE_KEYS = (losses.WINNER, losses.LOSER)
INPUT_IDS = "input_ids"  # (B, num_encoders, L) int32
EMBEDS = "embeds"  # (B, L, D)
POOLED = "pooled"  # (B, P), SDXL
TIME_IDS = "time_ids"  # (B, 6), SDXL


def slot_key(key: str, slot: int) -> str:
    return key if slot == 0 else f"{key}_{slot + 1}"


@flax.struct.dataclass
class Frozen:
    ref_params: Any = None  # None for losses without a reference (sft)
    text_params: Any = None  # tuple of encoder params; None when embeddings are cached
    empty: Conditioning | None = None  # encoding of "" with batch 1; None without dropout
    base_params: Any = None  # LoRA: the frozen base UNet under the adapters, also the reference


def frozen_shardings(frozen: Frozen, param_shardings: Any, mesh: Mesh, mesh_config: Any) -> Frozen:
    """The reference tree shares the policy's shardings; encoders and a LoRA base get the same
    FSDP rules."""
    return Frozen(
        base_params=(None if frozen.base_params is None
                     else sharding.shardings_from_config(frozen.base_params, mesh, mesh_config)),
        ref_params=None if frozen.ref_params is None else param_shardings,
        text_params=(None if frozen.text_params is None
                     else sharding.shardings_from_config(frozen.text_params, mesh, mesh_config)),
        empty=(None if frozen.empty is None
               else jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), frozen.empty)))


def _conditions(spec: losses.LossSpec, frozen: Frozen, batch: Batch,
                text_encode: TextEncodeFn | None) -> list[Conditioning]:
    conds = []
    for slot in range(spec.num_prompts):
        ids_key = slot_key(INPUT_IDS, slot)
        if ids_key in batch:
            if text_encode is None:
                raise ValueError(f"batch has {ids_key!r} but the step has no text encoder")
            # The encoders are frozen: no gradient flows into them.
            text = text_encode(frozen.text_params, jnp.swapaxes(batch[ids_key], 0, 1))
            embeds, pooled = jax.lax.stop_gradient(text.embeds), text.pooled
            pooled = None if pooled is None else jax.lax.stop_gradient(pooled)
        else:
            embeds, pooled = batch[slot_key(EMBEDS, slot)], batch.get(slot_key(POOLED, slot))
        if "drop" in batch:
            drop = batch["drop"][:, slot]
            embeds = jnp.where(drop[:, None, None], frozen.empty.embeds.astype(embeds.dtype), embeds)
            if pooled is not None:
                pooled = jnp.where(drop[:, None], frozen.empty.pooled.astype(pooled.dtype), pooled)
        conds.append(Conditioning(embeds, pooled, batch.get(TIME_IDS)))
    return conds


def _draw(rng: jax.Array, spec: losses.LossSpec, schedule: noise_lib.NoiseSchedule, batch: Batch,
          prompt_dropout: float, mesh: Mesh) -> Batch:
    """Per-example noise, timesteps and dropout mask, drawn for the whole global batch so that
    gradient accumulation splits exactly the draws a single large step would use."""
    noise_rng, t_rng, drop_rng = jax.random.split(rng, 3)
    winners = batch[losses.WINNER]
    b = winners.shape[0]
    shard = NamedSharding(mesh, sharding.BATCH_SPEC)
    out = dict(batch)
    out["noise"] = jax.lax.with_sharding_constraint(
        jax.random.normal(noise_rng, (b, spec.num_noise) + winners.shape[1:], jnp.float32), shard)
    out["timesteps"] = noise_lib.sample_timesteps(t_rng, schedule, (b,))
    if prompt_dropout > 0:
        out["drop"] = jax.random.bernoulli(drop_rng, prompt_dropout, (b, spec.num_prompts))
    return out


def _batch_objective(params: Any, frozen: Frozen, batch: Batch, *, denoiser: Denoiser,
                     spec: losses.LossSpec, schedule: noise_lib.NoiseSchedule, beta: float,
                     text_encode: TextEncodeFn | None) -> tuple[jax.Array, Metrics]:
    conds = _conditions(spec, frozen, batch, text_encode)
    images = {k: batch[k].astype(jnp.float32) for k in IMAGE_KEYS}
    noise = jnp.swapaxes(batch["noise"], 0, 1)
    policy, ref = params, frozen.ref_params
    if frozen.base_params is not None:  # LoRA: `params` are the adapters
        policy, ref = lora.WithAdapters(frozen.base_params, params), frozen.base_params
    return objective(policy, ref, denoiser, spec, schedule, beta, images, conds, noise, batch["timesteps"])


def _microbatches(batch: Batch, num: int, mesh: Mesh) -> Batch:
    """(B, ...) -> (num, B / num, ...). Row i goes to microbatch i % num: every device keeps its
    own rows (the batch dim stays sharded), so the split moves no data."""
    spec = NamedSharding(mesh, P(None, sharding.MESH_AXES))

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), spec)
    return jax.tree_util.tree_map(split, batch)


def make_train_step(*, denoiser: Denoiser, spec: losses.LossSpec,
                    schedule: noise_lib.NoiseSchedule, beta: float,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: TrainState, frozen_sharding: Frozen,
                    text_encode: TextEncodeFn | None = None, grad_accum_steps: int = 1,
                    prompt_dropout: float = 0.0, ema_decay: float = 0.0) -> Callable[[TrainState, Frozen, Batch],
                                                                              tuple[TrainState, Metrics]]:
    """The jitted step with explicit in/out shardings; argument 0 (the state) is donated.

    With `ema_decay` > 0 the state's `ema_params` follow every applied update."""
    if grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps={grad_accum_steps} must be >= 1")
    loss_fn = jax.value_and_grad(
        lambda params, frozen, batch: _batch_objective(
            params, frozen, batch, denoiser=denoiser, spec=spec, schedule=schedule, beta=beta,
            text_encode=text_encode), has_aux=True)

    def train_step(state: TrainState, frozen: Frozen, batch: Batch) -> tuple[TrainState, Metrics]:
        rng, step_rng = jax.random.split(state.rng)
        batch = _draw(step_rng, spec, schedule, batch, prompt_dropout, mesh)
        if grad_accum_steps == 1:
            (_, metrics), grads = loss_fn(state.params, frozen, batch)
        else:
            micro = _microbatches(batch, grad_accum_steps, mesh)

            def accumulate(carry, mb):
                (_, m), g = loss_fn(state.params, frozen, mb)
                return jax.tree_util.tree_map(jnp.add, carry, (g, m)), None
            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            zeros = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(lambda: (state.params, loss_fn(state.params, frozen, first)[0][1])))
            total, _ = jax.lax.scan(accumulate, zeros, micro)
            grads, metrics = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, total)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        applied = state.step - state.nonfinite_steps  # the optimizer's own update count

        def apply_update(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema_params
            if ema_decay > 0:
                ema = ema_update(ema, params, ema_decay_at(applied + 1, ema_decay))
            return params, opt_state, ema

        # A non-finite step leaves parameters, optimizer state and EMA exactly as they were.
        params, opt_state, ema = jax.lax.cond(
            finite, apply_update, lambda _: (state.params, state.opt_state, state.ema_params), None)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32), ema_params=ema)
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(applied),
                       nonfinite=(~finite).astype(jnp.int32))
        return new_state, metrics

    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(state_shardings, frozen_sharding, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(*, denoiser: Denoiser, spec: losses.LossSpec,
                   schedule: noise_lib.NoiseSchedule, beta: float, mesh: Mesh,
                   param_shardings: Any, frozen_sharding: Frozen,
                   text_encode: TextEncodeFn | None = None) -> Callable[[Any, Frozen, Batch, jax.Array],
                                                                        Metrics]:
    """Loss metrics without an update (e.g. implicit accuracy on held-out pairs)."""
    def eval_step(params: Any, frozen: Frozen, batch: Batch, rng: jax.Array) -> Metrics:
        batch = _draw(rng, spec, schedule, batch, 0.0, mesh)
        _, metrics = _batch_objective(params, frozen, batch, denoiser=denoiser, spec=spec,
                                      schedule=schedule, beta=beta, text_encode=text_encode)
        return metrics

    return jax.jit(eval_step, in_shardings=(param_shardings, frozen_sharding,
                                            sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                   out_shardings=sharding.replicated(mesh))
