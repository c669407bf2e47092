"""The train state, the optimizer, and placing both on the mesh.

The state is everything that changes during training and must be checkpointed to resume
exactly: step, trained parameters (the UNet, or its LoRA adapters when `train.lora.rank` > 0),
optimizer state, the RNG key, the count of skipped (non-finite) updates, and the EMA of the
parameters when `train.ema_decay` > 0. The frozen reference (or LoRA base) parameters are not
part of it: they never change and are re-read from the base model on resume.

Optimizers: AdamW (moments in float32 or bfloat16) or Adafactor, after global-norm clipping;
learning rate constant or cosine after a linear warmup, optionally scaled by the batch size.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from agfsync_jax import sharding
from agfsync_jax.models.dtype_policy import parse_dtype

OPTIMIZERS = ("adamw", "adafactor")
LR_SCHEDULES = ("constant", "cosine")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (including skipped ones)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; split once per step
    nonfinite_steps: jax.Array  # int32 scalar: steps whose update was skipped
    ema_params: Any = None  # EMA of `params` (train.ema_decay > 0), else None


def peak_learning_rate(train_config: Any) -> float:
    """`learning_rate`, times the pairs per update when `scale_lr` is on (as Diffusion-DPO)."""
    lr = float(train_config.learning_rate)
    return lr * int(train_config.batch_size) if bool(train_config.scale_lr) else lr


def learning_rate_schedule(train_config: Any) -> optax.Schedule:
    """Linear warmup from 0, then constant (Diffusion-DPO) or cosine decay to 0 at `steps`.

    The cosine branch equals diffusers' `get_cosine_schedule_with_warmup` (what the AGFSync
    authors' code uses), evaluated at the number of updates applied so far.
    """
    lr = peak_learning_rate(train_config)
    warmup = int(train_config.warmup_steps)
    kind = train_config.lr_schedule
    if kind not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={kind!r}, expected one of {LR_SCHEDULES}")
    if kind == "cosine":
        steps = int(train_config.steps)
        if steps <= warmup:
            raise ValueError(f"train.lr_schedule='cosine' needs train.steps ({steps}) > train.warmup_steps ({warmup})")
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps=steps, end_value=0.0)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup)


def _scale_by_adam_stored_as(dtype: Any, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """optax.scale_by_adam with both moments stored in `dtype` and updated in float32."""
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def cast(state, to):
        def one(x):
            return x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return state._replace(mu=jax.tree_util.tree_map(one, state.mu), nu=jax.tree_util.tree_map(one, state.nu))

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)
    return optax.GradientTransformation(init, update)


def make_optimizer(train_config: Any) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or Adafactor with the learning-rate schedule."""
    cfg = train_config
    schedule = learning_rate_schedule(cfg)
    moments = parse_dtype(cfg.adam_moments_dtype, "train.adam_moments_dtype")
    if cfg.optimizer == "adamw":
        b1, b2, eps = float(cfg.adam_b1), float(cfg.adam_b2), float(cfg.adam_eps)
        # optax.adamw's own chain, so float32 moments give exactly optax.adamw.
        scale = (optax.scale_by_adam(b1=b1, b2=b2, eps=eps) if moments == jnp.float32
                 else _scale_by_adam_stored_as(moments, b1, b2, eps))
        core = optax.chain(scale, optax.add_decayed_weights(float(cfg.weight_decay)),
                           optax.scale_by_learning_rate(schedule))
    elif cfg.optimizer == "adafactor":
        if moments != jnp.float32:
            raise ValueError(f"train.adam_moments_dtype={cfg.adam_moments_dtype!r} applies to adamw only; "
                             "Adafactor keeps factored float32 statistics")
        # transformers.Adafactor(scale_parameter=False, relative_step=False, clip_threshold=1.0,
        # weight_decay=wd) as Diffusion-DPO runs it for SDXL: second-moment decay 1 - t^-0.8, eps
        # 1e-30, no momentum, decay applied as lr * wd * param.
        core = optax.chain(optax.scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30), optax.clip_by_block_rms(1.0),
                           optax.add_decayed_weights(float(cfg.weight_decay)), optax.scale_by_learning_rate(schedule))
    else:
        raise ValueError(f"train.optimizer={cfg.optimizer!r}, expected one of {OPTIMIZERS}")
    clip = float(cfg.grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core


def ema_decay_at(update: jax.Array, decay: float) -> jax.Array:
    """Decay for the EMA update after optimizer update number `update` (1-based), as diffusers'
    EMAModel (no ema warmup): 0 at the first (the average starts at the parameters), then
    min(decay, update / (update + 9))."""
    update = update.astype(jnp.float32)
    return jnp.where(update <= 1, 0.0, jnp.minimum(decay, update / (update + 9.0)))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda e, p: (e - (1.0 - decay) * (e - p)).astype(e.dtype), ema, params)


def _fresh_state(params: Any, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), nonfinite_steps=jnp.zeros((), jnp.int32),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None)


def abstract_train_state(params: Any, tx: optax.GradientTransformation, seed: int = 0,
                         ema: bool = False) -> TrainState:
    """Shapes and dtypes of the state, without allocating it."""
    return jax.eval_shape(lambda p: _fresh_state(p, tx, seed, ema), params)


def train_state_shardings(abstract_state: TrainState, mesh: Mesh, mesh_config: Any) -> TrainState:
    """FSDP rules for every leaf: Adam moments get exactly their parameter's sharding because
    the rule depends only on a leaf's shape; scalars and the key are replicated."""
    return sharding.shardings_from_config(abstract_state, mesh, mesh_config)


def create_train_state(host_params: Any, tx: optax.GradientTransformation, seed: int,
                       shardings: TrainState) -> TrainState:
    """A fresh state on the mesh from host (numpy) parameters; nothing passes through one device.

    The state keeps an EMA when `shardings` has one."""
    params = sharding.place_tree(host_params, shardings.params)
    ema = shardings.ema_params is not None
    # Donated: the placed parameters become the state's, with no second copy on device.
    return jax.jit(lambda p: _fresh_state(p, tx, seed, ema), out_shardings=shardings,
                   donate_argnums=0)(params)
