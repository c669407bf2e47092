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


# --- schedulers that inject noise between steps (LCM, DDIM with eta > 0) -----------------------

def _step_noise(num_calls):
    return np.random.default_rng(1).standard_normal((num_calls,) + SHAPE).astype(np.float32)


def _pytorch_noisy_run(name, config, steps, x0, noise, eta, monkeypatch):
    """PyTorch's scheduler loop with its step noise replaced by `noise[i]` at step i.

    DDIM takes the noise as `variance_noise`; LCM draws it with `randn_tensor` inside `step`,
    which is patched here to hand out `noise` in order (and to count the draws).
    """
    import diffusers
    import diffusers.schedulers.scheduling_lcm as scheduling_lcm

    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE
        draws.append(len(draws))
        return torch.from_numpy(noise[len(draws) - 1]).to(dtype)

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", fake_randn)
    cls = {"ddim": diffusers.DDIMScheduler, "lcm": diffusers.LCMScheduler}[name]
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x0) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        eps = _model(x_in, t.to(torch.float32), torch)
        if name == "ddim":
            x = sched.step(eps, t, x, eta=eta, variance_noise=torch.from_numpy(noise[i])).prev_sample
        else:
            x = sched.step(eps, t, x).prev_sample
    return sched.timesteps.numpy(), x.numpy(), len(draws)


@jax.jit(static_argnums=0)
def _our_noisy_run(sched, x0, noise):
    x = x0 * sched.init_noise_sigma
    state = sched.init_state(x.shape)

    def body(i, carry):
        x, state = carry
        x_in = sched.scale_model_input(state, x, i)
        eps = _model(x_in, sched.timestep(i).astype(jnp.float32), jnp)
        return sched.step(state, eps, i, x, noise[i])
    return jax.lax.fori_loop(0, sched.num_model_calls, body, (x, state))[0]


NOISY_CASES = [
    ("lcm", {}, 4, 0.0),
    ("lcm", {}, 1, 0.0),  # one step: no noise at all
    ("lcm", {"original_inference_steps": 25, "timestep_scaling": 5.0}, 8, 0.0),
    ("lcm", {"prediction_type": "v_prediction", "clip_sample": True}, 5, 0.0),
    # SDXL's Euler config switched to LCM (the authors' `LCMScheduler.from_config`):
    ("lcm", {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading", "set_alpha_to_one": False,
             "interpolation_type": "linear", "use_karras_sigmas": False}, 5, 0.0),
    ("ddim", {"clip_sample": False, "set_alpha_to_one": False}, 10, 0.5),
    ("ddim", {"clip_sample": False, "timestep_spacing": "trailing"}, 7, 1.0),
    ("ddim", {"prediction_type": "v_prediction"}, 6, 0.3),
]


@pytest.mark.parametrize("name,overrides,steps,eta", NOISY_CASES)
def test_noisy_schedulers_match_pytorch_given_the_same_noise(name, overrides, steps, eta, monkeypatch):
    config = {**SD_SCHEDULE, **overrides}
    x0 = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    noise = _step_noise(steps)
    ref_t, ref, draws = _pytorch_noisy_run(name, config, steps, x0, noise, eta, monkeypatch)
    sched = schedulers.make_scheduler(name, config, steps, eta=eta)
    np.testing.assert_array_equal(sched.timesteps, ref_t)
    if name == "lcm":
        assert draws == steps - 1  # PyTorch re-noises after every step but the last
    assert sched.needs_step_noise == (steps > 1 if name == "lcm" else eta > 0)
    ours = np.asarray(_our_noisy_run(sched, x0, noise))
    diff = np.abs(ours - ref).max()
    assert diff < 2e-5 * max(1.0, np.abs(ref).max()), f"{name} {overrides}: max abs diff {diff}"
    if steps > 1:
        # Not vacuous: the injected noise changes the result.
        other = np.asarray(_our_noisy_run(sched, x0, noise[::-1].copy()))
        assert np.abs(other - ref).max() > 1e-2


def test_lcm_timesteps_are_the_distillation_schedule():
    """The published LCM schedule: 4 steps of the 50-point schedule are 999, 759, 499, 259."""
    sched = schedulers.make_scheduler("lcm", SD_SCHEDULE, 4)
    np.testing.assert_array_equal(sched.timesteps, [999, 759, 499, 259])


def test_noisy_schedulers_refuse_a_missing_noise():
    sched = schedulers.make_scheduler("lcm", SD_SCHEDULE, 4)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        sched.step(sched.init_state(SHAPE), x, 0, x)


@pytest.mark.parametrize("name,field,value", [
    ("lcm", "thresholding", True),
    ("lcm", "rescale_betas_zero_snr", True),
])
def test_unsupported_lcm_options_raise_naming_the_field(name, field, value):
    with pytest.raises(schedulers.SchedulerConfigError, match=field):
        schedulers.make_scheduler(name, {**SD_SCHEDULE, field: value}, 4)


def test_lcm_steps_beyond_the_original_schedule_and_eta_elsewhere_raise():
    with pytest.raises(schedulers.SchedulerConfigError, match="sampling.steps=60.*original_inference_steps=50"):
        schedulers.make_scheduler("lcm", SD_SCHEDULE, 60)
    with pytest.raises(schedulers.SchedulerConfigError, match="sampling.eta"):
        schedulers.make_scheduler("lcm", SD_SCHEDULE, 4, eta=0.5)
    with pytest.raises(schedulers.SchedulerConfigError, match="sampling.eta"):
        schedulers.make_scheduler("ddim", SD_SCHEDULE, 4, eta=-1.0)


# --- which scheduler: the folder's, or the config's with a warning ----------------------------

@pytest.mark.parametrize("class_name,name", [
    ("PNDMScheduler", "pndm"), ("EulerDiscreteScheduler", "euler"), ("LCMScheduler", "lcm"),
    ("DDIMScheduler", "ddim"), ("DPMSolverMultistepScheduler", "dpm_solver")])
def test_empty_scheduler_means_the_folders(class_name, name, caplog):
    with caplog.at_level("WARNING"):
        assert schedulers.resolve_name("", {"_class_name": class_name}, "f/scheduler_config.json") == name
        assert schedulers.resolve_name(name, {"_class_name": class_name}, "f/scheduler_config.json") == name
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_another_scheduler_than_the_folders_warns_naming_field_and_classes(caplog):
    with caplog.at_level("WARNING"):
        assert schedulers.resolve_name("ddim", {"_class_name": "PNDMScheduler"}, "f/scheduler_config.json") == "ddim"
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    message = record.getMessage()
    for part in ("sampling.scheduler='ddim'", "DDIMScheduler", "PNDMScheduler", "f/scheduler_config.json"):
        assert part in message


def test_unsupported_folder_scheduler_fails_naming_the_field_and_file():
    with pytest.raises(schedulers.SchedulerConfigError, match=r"sampling.scheduler.*f/scheduler_config.json.*Heun"):
        schedulers.resolve_name("", {"_class_name": "HeunDiscreteScheduler"}, "f/scheduler_config.json")
    with pytest.raises(schedulers.SchedulerConfigError, match="sampling.scheduler='heun'"):
        schedulers.resolve_name("heun", {"_class_name": "PNDMScheduler"}, "f/scheduler_config.json")
