"""The train state, the optimizer, and placing both on the mesh.

The state is everything that changes during training and must be checkpointed to resume
exactly: step, UNet parameters, optimizer state, the RNG key, and the count of skipped
(non-finite) updates. The frozen reference parameters are not part of it: they never change
and are re-read from the base model on resume.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from agfsync_jax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (including skipped ones)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; split once per step
    nonfinite_steps: jax.Array  # int32 scalar: steps whose update was skipped


def learning_rate_schedule(train_config: Any) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then constant (Diffusion-DPO's schedule)."""
    lr = float(train_config.learning_rate)
    warmup = int(train_config.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup)


def make_optimizer(train_config: Any) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup schedule."""
    adamw = optax.adamw(learning_rate_schedule(train_config), b1=float(train_config.adam_b1),
                        b2=float(train_config.adam_b2), eps=float(train_config.adam_eps),
                        weight_decay=float(train_config.weight_decay))
    clip = float(train_config.grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def _fresh_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), nonfinite_steps=jnp.zeros((), jnp.int32))


def abstract_train_state(params: Any, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """Shapes and dtypes of the state, without allocating it."""
    return jax.eval_shape(lambda p: _fresh_state(p, tx, seed), params)


def train_state_shardings(abstract_state: TrainState, mesh: Mesh, mesh_config: Any) -> TrainState:
    """FSDP rules for every leaf: Adam moments get exactly their parameter's sharding because
    the rule depends only on a leaf's shape; scalars and the key are replicated."""
    return sharding.shardings_from_config(abstract_state, mesh, mesh_config)


def create_train_state(host_params: Any, tx: optax.GradientTransformation, seed: int,
                       shardings: TrainState) -> TrainState:
    """A fresh state on the mesh from host (numpy) parameters; nothing passes through one device."""
    params = sharding.place_tree(host_params, shardings.params)
    # Donated: the placed parameters become the state's, with no second copy on device.
    return jax.jit(lambda p: _fresh_state(p, tx, seed), out_shardings=shardings,
                   donate_argnums=0)(params)
