"""The jitted step on the tiny SDXL model (pooled embeddings, time ids): it learns a preference
that is there, a non-finite step changes nothing but the skip count, and remat is switchable."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agfsync_jax import sharding
from agfsync_jax.training.train import build_training

STEPS = 24
BATCH = 4
WORDS = "red blue green cat dog bird house tree car boat".split()


def _pairs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """A batch as the pair dataset yields it; winners ~ N(+0.5, 0.5), losers ~ N(-0.5, 0.5)."""
    prompts = np.array([" ".join(rng.choice(WORDS, 3)) for _ in range(n)], object)
    return {"winner_latent": (0.5 + 0.5 * rng.standard_normal((n, 4, 16, 16))).astype(np.float32),
            "loser_latent": (-0.5 + 0.5 * rng.standard_normal((n, 4, 16, 16))).astype(np.float32),
            "prompt": prompts, "prompt_2": np.array([""] * n, object),
            "prompt_id": np.array([f"p{i}" for i in range(n)], object), "is_cross": np.zeros(n, bool)}


@pytest.fixture(scope="module")
def trained(tiny_sdxl):
    from configs import tiny

    config = tiny.get_config()
    config.model.tiny = "sdxl"
    config.train.batch_size = BATCH
    config.train.text_encoding = "cached"
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = build_training(config, tiny_sdxl, mesh)
    rng = np.random.default_rng(0)
    held_out = [sharding.place_batch(setup.inputs(_pairs(rng, BATCH)), mesh) for _ in range(4)]

    def held_out_accuracy(params) -> float:
        # Two noise and timestep draws per held-out batch.
        accs = [setup.eval_step(params, setup.frozen, b, jax.random.PRNGKey(100 + 2 * i + j))["implicit_acc"]
                for i, b in enumerate(held_out) for j in range(2)]
        return float(np.mean(jax.device_get(accs)))

    state = setup.initial_state(seed=0)
    before = held_out_accuracy(state.params)
    losses = []
    for _ in range(STEPS):
        batch = sharding.place_batch(setup.inputs(_pairs(rng, BATCH)), mesh)
        state, metrics = setup.train_step(state, setup.frozen, batch)
        losses.append(float(metrics["loss"]))
    return dict(setup=setup, mesh=mesh, state=state, losses=losses, before=before,
                after=held_out_accuracy(state.params), rng=rng)


@pytest.mark.slow
def test_implicit_accuracy_on_held_out_pairs_rises_well_above_chance(trained):
    print(f"held-out implicit accuracy {trained['before']:.3f} -> {trained['after']:.3f}; "
          f"train loss {trained['losses'][0]:.4f} -> {np.mean(trained['losses'][-5:]):.4f}")
    # At the first step policy == reference; float32 rounding of the two (differently compiled)
    # forwards, times beta = 5000, can move the loss off log 2 by ~1e-5 (exactness: test_objective).
    assert abs(trained["losses"][0] - math.log(2)) < 1e-3
    assert np.mean(trained["losses"][-5:]) < 0.5 * math.log(2)
    assert trained["after"] >= 0.8 and trained["after"] > trained["before"] + 0.25


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(trained):
    setup, mesh = trained["setup"], trained["mesh"]
    raw = _pairs(trained["rng"], BATCH)
    raw["winner_latent"][3, 0, 0, 0] = np.nan
    state = trained["state"]
    before = jax.device_get((state.params, state.opt_state, state.nonfinite_steps, state.step))
    batch = sharding.place_batch(setup.inputs(raw), mesh)
    after, metrics = setup.train_step(state, setup.frozen, batch)  # `state` is donated
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(after.nonfinite_steps) == int(before[2]) + 1 and int(after.step) == int(before[3]) + 1
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), (after.params, after.opt_state), before[:2])
    assert all(jax.tree_util.tree_leaves(same))


def test_remat_switch_rematerialises_the_unet(tiny_sdxl):
    """With train.remat the UNet forward sits under a checkpoint with the configured policy."""
    from agfsync_jax.models.denoiser import Conditioning, make_denoiser

    args = (tiny_sdxl.unet.params, jnp.zeros((1, 4, 16, 16)), jnp.zeros((1,), jnp.int32),
            Conditioning(jnp.zeros((1, 77, 64)), jnp.zeros((1, 32)), jnp.zeros((1, 6))))
    plain = str(jax.make_jaxpr(make_denoiser(tiny_sdxl.unet.module))(*args))
    remat = str(jax.make_jaxpr(make_denoiser(tiny_sdxl.unet.module, "dots_with_no_batch_dims_saveable"))(*args))
    marker = "DotsSaveable(only_if_no_batch_dims=True)"  # how the jaxpr prints the policy
    assert marker not in plain and marker in remat
    with pytest.raises(ValueError, match="remat_policy"):
        make_denoiser(tiny_sdxl.unet.module, "save_everything_please")
