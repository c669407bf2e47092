"""Our scheduler adapters (diffusers' Flax ports + fixes) against diffusers' PyTorch schedulers.

A synthetic, timestep-dependent "model" stands in for the UNet, so every scheduler and spacing
is checked in milliseconds; the UNet-in-the-loop parity lives in test_denoise_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agfsync_jax.sampling import schedulers

# The real SD schedule, as the tiny folders store it.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "steps_offset": 1}
SHAPE = (2, 4, 8, 8)


def _model(x, t, xp):
    """A smooth stand-in for a noise predictor: depends on the sample and the timestep."""
    return 0.3 * x * xp.cos(t / 300.0) + 0.2 * xp.sin(t / 70.0 + x)


def _pytorch_run(name, config, steps, x0):
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "dpm_solver": diffusers.DPMSolverMultistepScheduler,
           "euler": diffusers.EulerDiscreteScheduler, "pndm": diffusers.PNDMScheduler}[name]
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x0) * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        eps = _model(x_in, t.to(torch.float32), torch)
        x = sched.step(eps, t, x).prev_sample
    return sched.timesteps.numpy(), float(sched.init_noise_sigma), x.numpy()


@jax.jit(static_argnums=0)
def _our_run(sched, x0):
    x = x0 * sched.init_noise_sigma
    state = sched.init_state(x.shape)

    def body(i, carry):
        x, state = carry
        x_in = sched.scale_model_input(state, x, i)
        eps = _model(x_in, sched.timestep(i).astype(jnp.float32), jnp)
        return sched.step(state, eps, i, x)
    return jax.lax.fori_loop(0, sched.num_model_calls, body, (x, state))[0]


CASES = [
    ("ddim", {}, 10),
    ("ddim", {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False}, 7),
    ("ddim", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, 6),
    ("dpm_solver", {}, 10),  # final_sigmas_type "zero": the Flax port's last step differs
    ("dpm_solver", {"timestep_spacing": "linspace", "solver_order": 3}, 20),
    ("dpm_solver", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 8),
    ("euler", {"timestep_spacing": "leading", "steps_offset": 3}, 10),  # Flax hard-codes offset 1
    ("euler", {"timestep_spacing": "trailing"}, 9),
    ("euler", {"timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}, 5),
    ("pndm", {"skip_prk_steps": True}, 10),
    ("pndm", {"skip_prk_steps": True, "set_alpha_to_one": True}, 10),  # Flax clamps prev t to 0
    ("pndm", {"skip_prk_steps": False, "timestep_spacing": "trailing"}, 12),
]


@pytest.mark.parametrize("name,overrides,steps", CASES)
def test_matches_pytorch_scheduler(name, overrides, steps):
    config = {**SD_SCHEDULE, **overrides}
    x0 = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ref_t, ref_sigma, ref = _pytorch_run(name, config, steps, x0)
    sched = schedulers.make_scheduler(name, config, steps)
    np.testing.assert_array_equal(sched.timesteps, ref_t)
    assert sched.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6)
    ours = np.asarray(_our_run(sched, x0))
    diff = np.abs(ours - ref).max()
    assert diff < 2e-5 * max(1.0, np.abs(ref).max()), f"{name} {overrides}: max abs diff {diff}"


@pytest.mark.parametrize("name,overrides", [("dpm_solver", {}), ("pndm", {"skip_prk_steps": True,
                                                                       "set_alpha_to_one": True})])
def test_the_flax_port_alone_differs(name, overrides):
    """Guards the fixes above: without them the Flax ports miss PyTorch's last step (DPM-Solver
    lands at timestep 0 instead of sigma 0; PNDM clamps a negative previous timestep to 0)."""
    config = {**SD_SCHEDULE, **overrides}
    x0 = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    _, _, ref = _pytorch_run(name, config, 10, x0)
    fixed = schedulers.make_scheduler(name, config, 10)
    if name == "dpm_solver":
        unfixed = schedulers.Scheduler(name, config, 10)  # base class: no final-step fix
        unfixed.timesteps = fixed.timesteps
    else:
        unfixed = schedulers.make_scheduler(name, config, 10)
        unfixed._negative_prev[:] = False
    assert np.abs(np.asarray(_our_run(fixed, x0)) - ref).max() < 1e-4
    assert np.abs(np.asarray(_our_run(unfixed, x0)) - ref).max() > 1e-2


@pytest.mark.parametrize("name,field,value", [
    ("euler", "use_karras_sigmas", True),
    ("ddim", "rescale_betas_zero_snr", True),
    ("dpm_solver", "algorithm_type", "sde-dpmsolver++"),
    ("dpm_solver", "thresholding", True),
    ("euler", "interpolation_type", "log_linear"),
])
def test_unsupported_options_raise_naming_the_field(name, field, value):
    with pytest.raises(schedulers.SchedulerConfigError, match=field):
        schedulers.make_scheduler(name, {**SD_SCHEDULE, field: value}, 10)


def test_unknown_scheduler_and_bad_steps():
    with pytest.raises(schedulers.SchedulerConfigError, match="sampling.scheduler"):
        schedulers.make_scheduler("heun", SD_SCHEDULE, 10)
    with pytest.raises(schedulers.SchedulerConfigError, match="sampling.steps"):
        schedulers.make_scheduler("ddim", SD_SCHEDULE, 0)
