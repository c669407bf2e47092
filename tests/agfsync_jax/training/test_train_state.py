"""Optimizer and schedule options against the implementations they follow (optax.adamw,
transformers.Adafactor as Diffusion-DPO configures it, diffusers' cosine schedule and EMAModel),
each changing what it should, and each restored exactly from a checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from agfsync_jax import sharding
from agfsync_jax.training import checkpointing
from agfsync_jax.training.train_state import (
    abstract_train_state, create_train_state, ema_decay_at, ema_update, learning_rate_schedule, make_optimizer,
    train_state_shardings)

torch = pytest.importorskip("torch")


def _cfg(**overrides) -> ml_collections.ConfigDict:
    from configs import common

    cfg = common.base_config().train
    cfg.learning_rate, cfg.grad_clip_norm = 1e-3, 0.0
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": rng.standard_normal((128, 256)).astype(np.float32),
                      "bias": rng.standard_normal((256,)).astype(np.float32)}}


def _grads(step):
    return jax.tree_util.tree_map(lambda x: 0.1 * x, _params(100 + step))


def _run(tx, steps=4):
    params = jax.tree_util.tree_map(jnp.asarray, _params())
    state = tx.init(params)
    for i in range(steps):
        updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, _grads(i)), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_adamw_float32_is_optax_adamw_and_bf16_moments_are_stored_in_bf16():
    cfg = _cfg()
    ours, _ = _run(make_optimizer(cfg))
    reference, _ = _run(optax.adamw(1e-3, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay))
    assert _max_diff(ours, reference) == 0.0
    low, state = _run(make_optimizer(_cfg(adam_moments_dtype="bfloat16")))
    adam = state[0]
    assert {x.dtype for x in jax.tree_util.tree_leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    diff = _max_diff(low, reference)
    print(f"bf16 moments: max |params - float32 moments| after 4 steps {diff:.2e} (lr 1e-3)")
    assert 0 < diff < 4 * 1e-3 * 1e-2  # rounding of the moments, not another algorithm


def test_adafactor_matches_transformers_adafactor_as_diffusion_dpo_configures_it():
    from transformers.optimization import Adafactor

    cfg = _cfg(optimizer="adafactor")
    ours, state = _run(make_optimizer(cfg))
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v)) for k, v in _params()["dense"].items()}
    opt = Adafactor(list(torch_params.values()), lr=1e-3, weight_decay=cfg.weight_decay, clip_threshold=1.0,
                    scale_parameter=False, relative_step=False, warmup_init=False)
    for i in range(4):
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(_grads(i)["dense"][k])
        opt.step()
    theirs = {"dense": {k: p.detach().numpy() for k, p in torch_params.items()}}
    diff = _max_diff(ours, theirs)
    moved = _max_diff(ours, _params())
    print(f"adafactor vs transformers: max diff {diff:.2e}, update size {moved:.2e}")
    assert moved > 1e-3 and diff < 1e-6
    # Factored second moments: a row and a column vector for the kernel, not a full matrix.
    stat_sizes = [x.size for x in jax.tree_util.tree_leaves(state)]
    assert max(stat_sizes) < 128 * 256 and sum(stat_sizes) < 2000
    adamw, _ = _run(make_optimizer(_cfg()))
    assert _max_diff(ours, adamw) > 1e-4


def test_cosine_schedule_is_diffusers_cosine_with_warmup_and_scale_lr_multiplies_by_batch():
    from diffusers.optimization import get_cosine_schedule_with_warmup

    cfg = _cfg(lr_schedule="cosine", warmup_steps=5, steps=40)
    ours = learning_rate_schedule(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=40)
    theirs = []
    for _ in range(41):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose([float(ours(i)) for i in range(41)], theirs, rtol=1e-5, atol=1e-12)
    assert float(ours(40)) == 0.0 and np.isclose(float(learning_rate_schedule(_cfg(warmup_steps=5, steps=40))(40)), 1e-3)
    scaled = learning_rate_schedule(_cfg(scale_lr=True, batch_size=64))
    np.testing.assert_allclose(float(scaled(10)), 64e-3, rtol=1e-6)
    with pytest.raises(ValueError, match="train.lr_schedule"):
        learning_rate_schedule(_cfg(lr_schedule="linear"))


def test_ema_follows_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    decay = 0.99
    module = torch.nn.Linear(3, 2)
    ema_model = EMAModel(module.parameters(), decay=decay)
    ema = jax.tree_util.tree_map(jnp.asarray, {n: p.detach().numpy() for n, p in module.named_parameters()})
    rng = np.random.default_rng(0)
    for update in range(1, 31):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)))
        ema_model.step(module.parameters())
        params = {n: jnp.asarray(p.detach().numpy()) for n, p in module.named_parameters()}
        ema = ema_update(ema, params, ema_decay_at(jnp.int32(update), decay))
    theirs = {n: s.numpy() for (n, _), s in zip(module.named_parameters(), ema_model.shadow_params)}
    diff = _max_diff(ema, theirs)
    print(f"EMA vs diffusers EMAModel after 30 updates: {diff:.2e}")
    assert diff < 1e-5 and _max_diff(ema, {n: p.detach().numpy() for n, p in module.named_parameters()}) > 0.1


@pytest.mark.parametrize("options", [dict(optimizer="adafactor", lr_schedule="cosine", warmup_steps=2, steps=10),
                                     dict(adam_moments_dtype="bfloat16", ema_decay=0.9)])
def test_options_are_restored_exactly_from_a_checkpoint(tmp_path, options):
    cfg = _cfg(**options)
    tx = make_optimizer(cfg)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), jax.devices()[:1])
    mesh_cfg = ml_collections.ConfigDict({"shard_params": "fsdp", "min_shard_size": 2**16})
    ema = float(cfg.ema_decay) > 0
    abstract = abstract_train_state(_params(), tx, ema=ema)
    shardings = train_state_shardings(abstract, mesh, mesh_cfg)
    state = create_train_state(_params(), tx, 0, shardings)
    params = state.params
    for i in range(3):  # some optimizer history to restore
        updates, opt_state = tx.update(jax.tree_util.tree_map(jnp.asarray, _grads(i)), state.opt_state, params)
        params = optax.apply_updates(params, updates)
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_update(state.ema_params, params, 0.5) if ema else None)
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1, keep=1, async_save=False)
    ckpt.save(3, state, {"position": 3})
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored, _ = ckpt.restore(3, target)
    ckpt.close()
    saved, back = jax.device_get(state), jax.device_get(restored)
    pairs = list(zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(back)))
    assert len(pairs) == len(jax.tree_util.tree_leaves(abstract)) > 5
    assert all(np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b) for a, b in pairs)
    assert (back.ema_params is not None) == ema
    # The schedule position lives in the optimizer state: the next update uses the same lr.
    next_a, _ = tx.update(jax.tree_util.tree_map(jnp.asarray, _grads(9)), state.opt_state, state.params)
    next_b, _ = tx.update(jax.tree_util.tree_map(jnp.asarray, _grads(9)), restored.opt_state, restored.params)
    assert _max_diff(next_a, next_b) == 0.0
