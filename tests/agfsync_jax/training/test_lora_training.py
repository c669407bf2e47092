"""LoRA through the real train step (micro SD1.x UNet): the state holds only adapters and their
optimizer state, the base is stored once (bf16 allowed) and stays frozen, the first DPO loss is
log 2, every loss trains, and a non-finite step changes nothing but the skip count."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from agfsync_jax import lora, sharding
from agfsync_jax.models.dtype_policy import DtypePolicy
from agfsync_jax.models.loading import load_stable_diffusion
from agfsync_jax.training.train import build_training

BATCH = 2


def _raw(rng, cross=False, nan=False):
    raw = {"winner_latent": (0.5 + 0.5 * rng.standard_normal((BATCH, 4, 16, 16))).astype(np.float32),
           "loser_latent": (-0.5 + 0.5 * rng.standard_normal((BATCH, 4, 16, 16))).astype(np.float32),
           "prompt": np.array(["a red cat", "a blue dog"], object),
           "prompt_2": np.array(["a green cat", "a red dog"] if cross else ["", ""], object),
           "prompt_id": np.array(["p0", "p1"], object), "is_cross": np.full(BATCH, cross)}
    if nan:
        raw["winner_latent"][1, 0, 0, 0] = np.nan
    return raw


def _config(loss="dpo", **train):
    from configs import tiny

    c = tiny.get_config()
    c.train.batch_size, c.train.text_encoding, c.train.loss = BATCH, "cached", loss
    c.train.lora.rank = 4
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _leaves(tree):
    return jax.tree_util.tree_leaves(jax.device_get(tree))


def _train(config, sd, steps=2, cross=False):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = build_training(config, sd, mesh)
    state = setup.initial_state(seed=0)
    first = jax.device_get(state)
    base_before = _leaves(setup.frozen.base_params)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        state, metrics = setup.train_step(state, setup.frozen, sharding.place_batch(setup.inputs(_raw(rng, cross)), mesh))
        losses.append(float(metrics["loss"]))
    return setup, mesh, state, first, base_before, losses


def test_lora_state_is_adapters_on_a_frozen_bf16_base_and_skips_nonfinite_steps(micro_sd1_path):
    import jax.numpy as jnp

    sd = load_stable_diffusion(micro_sd1_path, DtypePolicy(param_dtype=jnp.bfloat16),
                               components=("unet", "text_encoders"))
    config = _config(ema_decay=0.9)
    setup, mesh, state, first, base_before, losses = _train(config, sd)
    # Only adapters are trained: the state's parameters, optimizer moments and EMA are adapter trees.
    assert lora.is_adapter_tree(jax.device_get(state.params)) and lora.is_adapter_tree(jax.device_get(state.ema_params))
    n_adapter = sum(x.size for x in _leaves(state.params))
    n_unet = sum(x.size for x in _leaves(setup.frozen.base_params))
    n_opt = sum(x.size for x in _leaves(state.opt_state))
    print(f"adapter parameters {n_adapter}, UNet {n_unet}, optimizer state {n_opt}; losses {losses}")
    assert n_opt <= 2 * n_adapter + 16 and n_adapter < n_unet / 5
    assert setup.frozen.ref_params is None  # the reference is the base, not a copy
    assert {x.dtype for x in _leaves(setup.frozen.base_params)} == {np.dtype(jnp.bfloat16)}
    assert {x.dtype for x in _leaves(state.params)} == {np.dtype(np.float32)}
    assert {x.dtype for x in _leaves(state.opt_state) if x.ndim} == {np.dtype(np.float32)}
    assert abs(losses[0] - math.log(2)) < 1e-6  # b = 0: policy == reference exactly
    assert all(np.array_equal(a, b) for a, b in zip(base_before, _leaves(setup.frozen.base_params)))
    moved = [not np.array_equal(a, b) for a, b in zip(_leaves(first.params), _leaves(state.params))]
    assert all(moved)  # a moved through b's gradient, b through its own

    before = jax.device_get((state.params, state.opt_state, state.ema_params, state.nonfinite_steps))
    bad = sharding.place_batch(setup.inputs(_raw(np.random.default_rng(1), nan=True)), mesh)
    after, metrics = setup.train_step(state, setup.frozen, bad)
    assert int(metrics["nonfinite"]) == 1 and int(after.nonfinite_steps) == int(before[3]) + 1
    same = jax.tree_util.tree_map(np.array_equal, jax.device_get((after.params, after.opt_state, after.ema_params)),
                                  before[:3])
    assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cross_dpo", "sft", "released_code_dpo"])
def test_every_loss_trains_the_adapters(micro_sd1_path, loss):
    sd = load_stable_diffusion(micro_sd1_path, components=("unet", "text_encoders"))
    config = _config(loss, beta=1.0 if loss == "released_code_dpo" else 5000.0)
    setup, _, state, first, _, losses = _train(config, sd, steps=3, cross=loss == "cross_dpo")
    print(loss, losses)
    assert all(np.isfinite(losses)) and len(set(losses)) > 1
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(first.params), _leaves(state.params)))
    if loss == "sft":
        assert setup.spec.uses_reference is False
