"""The loss formulas and the noise schedule, on small arrays (no UNet)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agfsync_jax.training import losses, noise


def _preds(seed: int, views: int, batch: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (views, batch, 4, 3, 3)
    target = rng.standard_normal(shape).astype(np.float32)
    policy = target + 0.3 * rng.standard_normal(shape).astype(np.float32)
    ref = target + 0.3 * rng.standard_normal(shape).astype(np.float32)
    return policy, ref, target


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def test_dpo_loss_matches_the_formula():
    policy, ref, target = _preds(0, views=2)
    beta = 7.0
    err = lambda p: ((p - target) ** 2).mean(axis=(2, 3, 4))  # noqa: E731
    (pw, pl), (rw, rl) = err(policy), err(ref)
    inside = -0.5 * beta * ((pw - pl) - (rw - rl))
    loss, m = losses.dpo_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(target), beta)
    np.testing.assert_allclose(loss, -_log_sigmoid(inside).mean(), rtol=1e-6)
    np.testing.assert_allclose(m["implicit_acc"], (inside > 0).mean())
    np.testing.assert_allclose(m["reward_margin"], inside.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["policy_err_l"], pl.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["ref_err_w"], rw.mean(), rtol=1e-6)
    assert 0 < float(m["implicit_acc"]) < 1  # the example is not degenerate


def test_cross_loss_sums_both_triples_inside_one_sigmoid():
    policy, ref, target = _preds(1, views=4)
    beta = 3.0
    e = lambda p: ((p - target) ** 2).mean(axis=(2, 3, 4))  # noqa: E731
    p, r = e(policy), e(ref)
    inside = -0.5 * beta * (((p[0] - p[1]) - (r[0] - r[1])) + ((p[2] - p[3]) - (r[2] - r[3])))
    loss, m = losses.cross_dpo_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(target), beta)
    np.testing.assert_allclose(loss, -_log_sigmoid(inside).mean(), rtol=1e-6)
    np.testing.assert_allclose(m["implicit_acc"], (inside > 0).mean())
    # Swapping the roles of the two triples' winners flips every margin.
    swapped = policy[[1, 0, 3, 2]], ref[[1, 0, 3, 2]], target[[1, 0, 3, 2]]
    _, m2 = losses.cross_dpo_loss(*map(jnp.asarray, swapped), beta)
    np.testing.assert_allclose(m2["reward_margin"], -inside.mean(), rtol=1e-5)


def test_released_code_variant_uses_the_unsquared_batch_norm():
    policy, ref, target = _preds(2, views=2)
    norm = lambda p: np.sqrt(((p - target) ** 2).sum(axis=(1, 2, 3, 4)))  # noqa: E731
    (pw, pl), (rw, rl) = norm(policy), norm(ref)
    inside = -0.5 * 1.0 * ((pw - pl) - (rw - rl))
    loss, m = losses.released_code_dpo_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(target), 1.0)
    np.testing.assert_allclose(loss, -_log_sigmoid(np.array(inside)), rtol=1e-5)
    assert losses.get_loss("released_code_dpo").num_noise == 2  # independent noise per view
    assert losses.get_loss("dpo").num_noise == 1


def test_sft_is_the_winners_denoising_loss_and_needs_no_reference():
    policy, _, target = _preds(3, views=1)
    loss, _ = losses.sft_loss(jnp.asarray(policy), None, jnp.asarray(target), 5000.0)
    np.testing.assert_allclose(loss, ((policy - target) ** 2).mean(), rtol=1e-6)
    assert not losses.get_loss("sft").uses_reference


@pytest.mark.parametrize("name", ["dpo", "cross_dpo", "released_code_dpo"])
def test_preference_losses_are_log2_when_policy_equals_reference(name):
    spec = losses.get_loss(name)
    policy, _, target = _preds(4, views=spec.num_views)
    loss, m = spec.fn(jnp.asarray(policy), jnp.asarray(policy), jnp.asarray(target), 5000.0)
    assert abs(float(loss) - math.log(2)) < 1e-6
    assert float(m["implicit_acc"]) == 0.0  # margins are exactly 0, never > 0


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="train.loss"):
        losses.get_loss("ipo")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_noise_schedule_matches_diffusers(beta_schedule, prediction_type):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule=beta_schedule, prediction_type=prediction_type)
    reference = DDPMScheduler(**config)
    schedule = noise.schedule_from_config(config)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 250, 998, 999])
    # diffusers accumulates alphas_cumprod in float32, we in float64: they differ in the last digits.
    expected_xt = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t))
    np.testing.assert_allclose(noise.add_noise(schedule, x0, eps, t), expected_xt.numpy(), rtol=1e-4, atol=1e-5)
    expected_target = (torch.from_numpy(eps) if prediction_type == "epsilon" else
                       reference.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)))
    np.testing.assert_allclose(noise.regression_target(schedule, x0, eps, t), expected_target.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_noise_schedule_rejects_what_it_cannot_train():
    with pytest.raises(ValueError, match="prediction_type"):
        noise.schedule_from_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="zero_snr"):
        noise.schedule_from_config({"rescale_betas_zero_snr": True})


def test_timesteps_cover_the_whole_range():
    schedule = noise.schedule_from_config({"num_train_timesteps": 10})
    t = noise.sample_timesteps(jax.random.PRNGKey(0), schedule, (2000,))
    assert t.dtype == jnp.int32 and set(np.unique(t).tolist()) == set(range(10))
