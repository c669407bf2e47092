"""Diffusers' Flax schedulers, driven by step index, with their differences from PyTorch fixed.

diffusers' PyTorch schedulers are the reference: they are what every Stable Diffusion user runs,
and our parity tests compare against them. The Flax ports (`FlaxDDIMScheduler`, ...) do the
per-step math, but they lag behind PyTorch in a few places, each fixed here on our side:

* Timesteps. The Flax ports implement only some `timestep_spacing` values (DDIM and PNDM:
  "leading" only; Euler: "linspace" and "leading", and "leading" adds a hard-coded 1 instead of
  `steps_offset`; DPM-Solver's "leading" reads a `steps_offset` it never registers). We compute
  the timesteps (and Euler's sigmas) on the host exactly as the PyTorch `set_timesteps` does and
  put them into the Flax state.
* DPM-Solver's last step. PyTorch (`final_sigmas_type="zero"`, its default) takes a first-order
  step to sigma = 0, i.e. returns the data prediction x0; the Flax port steps to timestep 0
  (sigma_min), which leaves sqrt(1 - alpha_bar_0) ~ 3% of the noise estimate in the result.
* PNDM's last step. PyTorch uses `final_alpha_cumprod` when the previous timestep is negative;
  the Flax port clamps it to 0 and uses `alphas_cumprod[0]` instead. The two agree unless
  `set_alpha_to_one=True`; we recompute those steps with the PyTorch rule.

Options that PyTorch honours but the Flax ports do not implement (Karras sigmas, thresholding,
zero-SNR rescaling, ...) raise `SchedulerConfigError` naming the field, instead of silently
sampling something else.

Two schedulers have no Flax port and are written here in JAX from the PyTorch code: LCM
(`LCMScheduler`: consistency-model multistep sampling, what LCM-LoRA and LCM-distilled UNets are
sampled with) and DDIM's stochastic variant (`eta > 0`: the Flax DDIM step takes `eta` but never
adds the noise). Both inject fresh Gaussian noise between steps; the denoising loop passes that
noise in (`step(..., noise=...)`), drawn from per-candidate keys, so sampling stays a pure
function of its inputs.

The denoising loop drives a scheduler by step index (`step(state, eps, i, x)`), so repeated
timesteps (PNDM's PLMS warm-up) and float timesteps (Euler) need no lookups by value.

Which scheduler: `resolve_name` maps `sampling.scheduler` ("" = the class the model folder's
scheduler_config.json names) to one of SCHEDULERS, and warns when the config overrides the
folder's class.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

SCHEDULERS: tuple[str, ...] = ("ddim", "dpm_solver", "euler", "pndm", "lcm")
# The diffusers (PyTorch) class each name reproduces, as a scheduler_config.json's `_class_name`.
DIFFUSERS_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler", "dpm_solver": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler", "lcm": "LCMScheduler"}

# PyTorch defaults (diffusers 0.39) of every option that changes the sampled result. A folder's
# scheduler_config.json is written for one class (SD1.x: PNDM, SDXL: Euler); switching class
# keeps the shared keys and takes the new class's defaults for the rest, as `from_config` does.
_COMMON_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0,
}
_PYTORCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {**_COMMON_DEFAULTS, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
             "timestep_spacing": "leading", "thresholding": False, "rescale_betas_zero_snr": False},
    "dpm_solver": {**_COMMON_DEFAULTS, "solver_order": 2, "algorithm_type": "dpmsolver++",
                   "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                   "final_sigmas_type": "zero", "timestep_spacing": "linspace", "thresholding": False,
                   "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                   "use_lu_lambdas": False, "use_flow_sigmas": False, "lambda_min_clipped": -math.inf,
                   "variance_type": None, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False},
    "euler": {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "interpolation_type": "linear",
              "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "sigma_min": None, "sigma_max": None, "timestep_type": "discrete",
              "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "pndm": {**_COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False,
             "timestep_spacing": "leading"},
    # LCMScheduler's own defaults differ from the others' (SD's betas). `timestep_spacing` and
    # `steps_offset` are registered but unused by its `set_timesteps`.
    "lcm": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "trained_betas": None, "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
            "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
            "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
}
# field -> values we implement; any other value raises.
_SPACINGS = ("leading", "trailing", "linspace")
_SUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "ddim": {"timestep_spacing": _SPACINGS, "thresholding": (False,), "rescale_betas_zero_snr": (False,),
             "prediction_type": ("epsilon", "sample", "v_prediction")},
    "dpm_solver": {"timestep_spacing": _SPACINGS, "thresholding": (False,),
                   "algorithm_type": ("dpmsolver++", "dpmsolver"), "solver_type": ("midpoint", "heun"),
                   "solver_order": (1, 2, 3), "euler_at_final": (False,),
                   "final_sigmas_type": ("zero", "sigma_min"), "use_karras_sigmas": (False,),
                   "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
                   "use_flow_sigmas": (False,), "lambda_min_clipped": (-math.inf,), "variance_type": (None,),
                   "rescale_betas_zero_snr": (False,), "use_dynamic_shifting": (False,),
                   "prediction_type": ("epsilon", "sample", "v_prediction")},
    "euler": {"timestep_spacing": _SPACINGS, "interpolation_type": ("linear",), "use_karras_sigmas": (False,),
              "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "timestep_type": ("discrete",),
              "rescale_betas_zero_snr": (False,), "final_sigmas_type": ("zero", "sigma_min"),
              "prediction_type": ("epsilon", "v_prediction")},
    "pndm": {"timestep_spacing": _SPACINGS, "prediction_type": ("epsilon", "v_prediction")},
    "lcm": {"thresholding": (False,), "rescale_betas_zero_snr": (False,),
            "prediction_type": ("epsilon", "sample", "v_prediction")},
}


class SchedulerConfigError(ValueError):
    """The scheduler name or a scheduler_config field is not supported; the message names it."""


def effective_config(name: str, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The PyTorch scheduler `name` would run with: its defaults, overridden by the folder's config."""
    if name not in SCHEDULERS:
        raise SchedulerConfigError(f"sampling.scheduler={name!r}: expected one of {SCHEDULERS}")
    config = dict(_PYTORCH_DEFAULTS[name])
    config.update({k: v for k, v in scheduler_config.items() if k in config})
    for field, allowed in _SUPPORTED[name].items():
        if config[field] not in allowed:
            raise SchedulerConfigError(
                f"scheduler {name!r}: scheduler_config field {field!r} is {config[field]!r}; "
                f"only {list(allowed)} is implemented (the Flax port lacks the rest)")
    if name == "dpm_solver" and config["final_sigmas_type"] == "zero" and config["algorithm_type"] != "dpmsolver++":
        # PyTorch refuses this combination too.
        raise SchedulerConfigError("scheduler 'dpm_solver': final_sigmas_type 'zero' needs algorithm_type 'dpmsolver++'")
    return config


def resolve_name(requested: str, scheduler_config: Mapping[str, Any], where: str) -> str:
    """The scheduler to sample with: `sampling.scheduler`, or with "" the folder's class.

    Args:
        requested: the config's `sampling.scheduler` ("" or one of SCHEDULERS).
        scheduler_config: the model folder's scheduler_config.json.
        where: that file's path, for messages.

    A requested class other than the folder's is honoured, with a warning: it runs with the
    folder's shared fields (betas, offsets, ...) and its own defaults for the rest, as
    diffusers' `from_config` does.
    """
    folder_class = scheduler_config.get("_class_name")
    folder_name = {v: k for k, v in DIFFUSERS_CLASSES.items()}.get(folder_class)
    if requested == "":
        if folder_name is None:
            raise SchedulerConfigError(
                f"sampling.scheduler='' samples with the model folder's scheduler, but {where} names "
                f"{folder_class!r}, which is not implemented; set sampling.scheduler to one of {SCHEDULERS}")
        return folder_name
    if requested not in SCHEDULERS:
        raise SchedulerConfigError(f"sampling.scheduler={requested!r}: expected '' (the folder's) or one of {SCHEDULERS}")
    if requested != folder_name:
        logging.warning("sampling.scheduler=%r samples with %s, but the model folder's %s names %s "
                        "(set sampling.scheduler='' to use the folder's)",
                        requested, DIFFUSERS_CLASSES[requested], where, folder_class)
    return requested


def _flax_class(name: str) -> Any:
    from diffusers import (FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler, FlaxEulerDiscreteScheduler,
                           FlaxPNDMScheduler)
    # LCM has no Flax port; the DDIM one supplies its betas and alphas_cumprod (same formulas).
    return {"ddim": FlaxDDIMScheduler, "dpm_solver": FlaxDPMSolverMultistepScheduler,
            "euler": FlaxEulerDiscreteScheduler, "pndm": FlaxPNDMScheduler, "lcm": FlaxDDIMScheduler}[name]


def _build_flax(name: str, config: Mapping[str, Any]) -> Any:
    cls = _flax_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "dtype"}
    kwargs = {k: v for k, v in config.items() if k in accepted}
    # We overwrite the timesteps after `set_timesteps`; "linspace" is the one spacing that every
    # Flax port's `set_timesteps` accepts without reading unregistered fields.
    if "timestep_spacing" in accepted:
        kwargs["timestep_spacing"] = "linspace"
    return cls(**kwargs, dtype=jnp.float32)


def _leading_trailing_linspace(config: Mapping[str, Any], num_steps: int, *, dpm: bool) -> np.ndarray:
    """Integer timesteps, highest first, as PyTorch DDIM (dpm=False) or DPM-Solver (dpm=True) spaces them."""
    n_train = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    # DPM-Solver spaces num_steps + 1 points and drops the last (t = 0).
    points = num_steps + 1 if dpm else num_steps
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, points).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, points) * (n_train // points)).round()[::-1] + config["steps_offset"]
    else:
        ts = np.round(np.arange(n_train, 0, -n_train / num_steps)) - 1
    ts = ts[:-1] if dpm and spacing != "trailing" else ts
    return ts.astype(np.int64)


class Scheduler:
    """A scheduler set up for a fixed number of steps; `step` and `scale_model_input` are jittable.

    Attributes:
        name: one of SCHEDULERS.
        config: the effective PyTorch-equivalent scheduler config.
        num_steps: the requested number of inference steps.
        timesteps: (num_model_calls,) the timestep fed to the UNet at each model call, in order.
            PNDM with Runge-Kutta warm-up (`skip_prk_steps=False`) calls the model more often
            than `num_steps`.
        init_noise_sigma: the initial latents are unit Gaussians times this (PyTorch pipelines do
            the same with latents passed in by the caller).
        needs_step_noise: `step` takes fresh unit Gaussian noise of the sample's shape at
            every model call (LCM, DDIM with eta > 0); the others ignore it.
    """

    needs_step_noise = False

    def __init__(self, name: str, scheduler_config: Mapping[str, Any], num_steps: int):
        if num_steps < 1:
            raise SchedulerConfigError(f"sampling.steps must be >= 1, got {num_steps}")
        self.name = name
        self.config = effective_config(name, scheduler_config)
        if num_steps > self.config["num_train_timesteps"]:
            raise SchedulerConfigError(
                f"sampling.steps={num_steps} exceeds num_train_timesteps={self.config['num_train_timesteps']}")
        self.num_steps = num_steps
        self.flax = _build_flax(name, self.config)
        self._common = self.flax.create_state()
        self.alphas_cumprod = np.asarray(self._common.common.alphas_cumprod, np.float64)
        self.timesteps = self._timesteps()
        self.init_noise_sigma = 1.0

    @property
    def num_model_calls(self) -> int:
        return len(self.timesteps)

    def _timesteps(self) -> np.ndarray:
        return _leading_trailing_linspace(self.config, self.num_steps, dpm=False)

    def init_state(self, sample_shape: tuple[int, ...]) -> Any:
        """The scheduler's running state for samples of this shape (a pytree; jittable)."""
        state = self.flax.set_timesteps(self._common, self.num_steps, sample_shape)
        return state.replace(timesteps=jnp.asarray(self.timesteps))

    def timestep(self, index: jax.Array) -> jax.Array:
        """The UNet's timestep at model call `index` (a traced scalar is fine)."""
        return jnp.asarray(self.timesteps)[index]

    def scale_model_input(self, state: Any, sample: jax.Array, index: jax.Array) -> jax.Array:
        return self.flax.scale_model_input(state, sample, self.timestep(index))

    def step(self, state: Any, model_output: jax.Array, index: jax.Array, sample: jax.Array,
             noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """x_{t_index} -> x_{t_index+1} given the (guided) model output at model call `index`.

        `noise` (unit Gaussians, the sample's shape) is required when `needs_step_noise`.
        """
        prev_sample, state = self.flax.step(state, model_output, self.timestep(index), sample, return_dict=False)
        return prev_sample, state

    def _require_noise(self, noise: jax.Array | None, sample: jax.Array) -> jax.Array:
        if noise is None:
            raise ValueError(f"scheduler {self.name!r} injects noise between steps: pass `noise` to step()")
        if noise.shape != sample.shape:
            raise ValueError(f"step noise has shape {noise.shape}, the sample {sample.shape}")
        return noise.astype(sample.dtype)


class _DDIM(Scheduler):
    """DDIM; with eta > 0 the stochastic variant (DDIM paper eq. 12 and 16, diffusers' `eta`)."""

    def __init__(self, name: str, scheduler_config: Mapping[str, Any], num_steps: int, eta: float = 0.0):
        super().__init__(name, scheduler_config, num_steps)
        if not (math.isfinite(eta) and eta >= 0):
            raise SchedulerConfigError(f"sampling.eta={eta!r} must be a finite number >= 0")
        self.eta = float(eta)
        self.needs_step_noise = self.eta > 0
        # sigma_t(eta) per model call, as PyTorch's DDIMScheduler.step computes it in float32.
        ac = self.alphas_cumprod.astype(np.float32)
        final = np.float32(1.0) if self.config["set_alpha_to_one"] else ac[0]
        t = self.timesteps
        prev = t - self.config["num_train_timesteps"] // num_steps
        alpha_t = ac[t]
        alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        self._std_dev = (np.float32(self.eta) * np.sqrt(variance)).astype(np.float32)

    def step(self, state: Any, model_output: jax.Array, index: jax.Array, sample: jax.Array,
             noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        # The Flax step shrinks the direction term by sigma_t but adds no noise; PyTorch adds
        # sigma_t * z at every step, the last one included.
        prev_sample, state = self.flax.step(state, model_output, self.timestep(index), sample, eta=self.eta,
                                            return_dict=False)
        if self.eta > 0:
            prev_sample = prev_sample + jnp.asarray(self._std_dev)[index] * self._require_noise(noise, sample)
        return prev_sample, state


class _LCM(Scheduler):
    """diffusers' LCMScheduler in JAX (there is no Flax port).

    Each step predicts x0, applies the consistency boundary condition
    `denoised = c_out * x0 + c_skip * x_t` and, except at the last step, re-noises `denoised`
    to the next timestep with fresh noise. Timesteps: the `original_inference_steps`-point
    distillation schedule, subsampled evenly to `num_steps`.
    """

    def __init__(self, name: str, scheduler_config: Mapping[str, Any], num_steps: int):
        super().__init__(name, scheduler_config, num_steps)
        self.needs_step_noise = num_steps > 1  # one-step sampling draws no noise
        ac = self.alphas_cumprod.astype(np.float32)
        t = self.timesteps
        prev = np.concatenate([t[1:], t[-1:]])  # PyTorch uses t itself as "previous" at the last step
        alpha_t, alpha_prev = ac[t], ac[prev]
        sigma_data = 0.5
        scaled = t.astype(np.float32) * np.float32(self.config["timestep_scaling"])
        per_step = {
            "sqrt_alpha": np.sqrt(alpha_t), "sqrt_beta": np.sqrt(1 - alpha_t),
            "sqrt_alpha_prev": np.sqrt(alpha_prev), "sqrt_beta_prev": np.sqrt(1 - alpha_prev),
            "c_skip": sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2),
            "c_out": scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5,
        }
        self._per_step = {k: v.astype(np.float32) for k, v in per_step.items()}

    def _timesteps(self) -> np.ndarray:
        n_train, n = self.config["num_train_timesteps"], self.num_steps
        original = self.config["original_inference_steps"]
        if original > n_train:
            raise SchedulerConfigError(
                f"scheduler 'lcm': original_inference_steps={original} exceeds num_train_timesteps={n_train}")
        if n > original:
            raise SchedulerConfigError(
                f"sampling.steps={n} exceeds the LCM scheduler's original_inference_steps={original}: its "
                f"timesteps are a subset of that schedule")
        k = n_train // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return origin[indices].astype(np.int64)

    def init_state(self, sample_shape: tuple[int, ...]) -> Any:
        return ()  # stateless: everything per step is precomputed

    def scale_model_input(self, state: Any, sample: jax.Array, index: jax.Array) -> jax.Array:
        return sample

    def step(self, state: Any, model_output: jax.Array, index: jax.Array, sample: jax.Array,
             noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        c = {k: jnp.asarray(v)[index] for k, v in self._per_step.items()}
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            x0 = (sample - c["sqrt_beta"] * model_output) / c["sqrt_alpha"]
        elif prediction == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = c["sqrt_alpha"] * sample - c["sqrt_beta"] * model_output
        if self.config["clip_sample"]:
            x0 = jnp.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        denoised = c["c_out"] * x0 + c["c_skip"] * sample
        if not self.needs_step_noise:
            return denoised, state
        renoised = c["sqrt_alpha_prev"] * denoised + c["sqrt_beta_prev"] * self._require_noise(noise, sample)
        return jnp.where(index == self.num_model_calls - 1, denoised, renoised), state


class _DPMSolver(Scheduler):
    def _timesteps(self) -> np.ndarray:
        return _leading_trailing_linspace(self.config, self.num_steps, dpm=True)

    def step(self, state: Any, model_output: jax.Array, index: jax.Array, sample: jax.Array,
             noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        prev_sample, state = super().step(state, model_output, index, sample)
        if self.config["final_sigmas_type"] == "zero":
            # A first-order step to sigma = 0 returns the data prediction, which the Flax step
            # has just stored as the newest converted model output.
            is_last = index == self.num_model_calls - 1
            prev_sample = jnp.where(is_last, state.model_outputs[-1].astype(prev_sample.dtype), prev_sample)
        return prev_sample, state


class _Euler(Scheduler):
    def __init__(self, name: str, scheduler_config: Mapping[str, Any], num_steps: int):
        super().__init__(name, scheduler_config, num_steps)
        self.sigmas = self._sigmas()
        max_sigma = float(self.sigmas.max())
        self.init_noise_sigma = (max_sigma if self.config["timestep_spacing"] in ("linspace", "trailing")
                                 else (max_sigma ** 2 + 1) ** 0.5)

    def _timesteps(self) -> np.ndarray:
        n_train, n = self.config["num_train_timesteps"], self.num_steps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.float32) + self.config["steps_offset"]
        else:
            ts = np.arange(n_train, 0, -n_train / n).round().astype(np.float32) - 1
        return ts.astype(np.float32)

    def _sigmas(self) -> np.ndarray:
        ac = self.alphas_cumprod.astype(np.float32)
        train_sigmas = ((1 - ac) / ac) ** 0.5
        sigmas = np.interp(self.timesteps, np.arange(len(train_sigmas)), train_sigmas)
        last = train_sigmas[0] if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        return np.concatenate([sigmas, [last]]).astype(np.float32)

    def init_state(self, sample_shape: tuple[int, ...]) -> Any:
        state = super().init_state(sample_shape)
        return state.replace(sigmas=jnp.asarray(self.sigmas),
                             init_noise_sigma=jnp.asarray(self.init_noise_sigma, jnp.float32))


class _PNDM(Scheduler):
    def _timesteps(self) -> np.ndarray:
        n_train, n = self.config["num_train_timesteps"], self.num_steps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            base = np.linspace(0, n_train - 1, n).round()
        elif spacing == "leading":
            base = (np.arange(0, n) * (n_train // n)).round() + self.config["steps_offset"]
        else:
            base = np.round(np.arange(n_train, 0, -n_train / n))[::-1] - 1
        base = base.astype(np.int64)
        if self.config["skip_prk_steps"]:
            self._prk = np.array([], np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            half_step = np.tile(np.array([0, n_train // n // 2]), 4)
            prk = base[-4:].repeat(2) + half_step
            self._prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = base[:-3][::-1]
        self._plms = plms
        timesteps = np.concatenate([self._prk, plms]).astype(np.int64)
        # PyTorch steps PLMS calls (counter != 1) to t - n_train // n and, when that is negative,
        # uses final_alpha_cumprod; the Flax port clamps it to 0 (see module docstring).
        counters = np.arange(len(timesteps))
        in_plms = counters >= len(self._prk)
        self._negative_prev = in_plms & (counters != 1) & (timesteps - n_train // n < 0)
        return timesteps

    def init_state(self, sample_shape: tuple[int, ...]) -> Any:
        state = super().init_state(sample_shape)
        return state.replace(prk_timesteps=jnp.asarray(self._prk), plms_timesteps=jnp.asarray(self._plms))

    def step(self, state: Any, model_output: jax.Array, index: jax.Array, sample: jax.Array,
             noise: jax.Array | None = None) -> tuple[jax.Array, Any]:
        prev_sample, state = super().step(state, model_output, index, sample)
        if not self._negative_prev.any():
            return prev_sample, state
        fixed = _pndm_formula_9(state.common.alphas_cumprod[self.timestep(index)], state.final_alpha_cumprod,
                                state.cur_sample, state.cur_model_output, self.config["prediction_type"])
        return jnp.where(jnp.asarray(self._negative_prev)[index], fixed, prev_sample), state


def _pndm_formula_9(alpha_t: jax.Array, alpha_prev: jax.Array, sample: jax.Array, eps: jax.Array,
                    prediction_type: str) -> jax.Array:
    """x_{t-delta} from x_t and the PLMS noise estimate (PNDM paper, eq. 9)."""
    if prediction_type == "v_prediction":
        eps = alpha_t ** 0.5 * eps + (1 - alpha_t) ** 0.5 * sample
    denom = alpha_t * (1 - alpha_prev) ** 0.5 + (alpha_t * (1 - alpha_t) * alpha_prev) ** 0.5
    return (alpha_prev / alpha_t) ** 0.5 * sample - (alpha_prev - alpha_t) * eps / denom


_CLASSES = {"ddim": _DDIM, "dpm_solver": _DPMSolver, "euler": _Euler, "pndm": _PNDM, "lcm": _LCM}


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], num_steps: int, *,
                   eta: float = 0.0) -> Scheduler:
    """The scheduler `name` (a resolved sampling.scheduler) for a model folder's scheduler_config.

    `eta` (sampling.eta) is DDIM's noise level: 0 is deterministic DDIM, 1 DDPM-like.
    """
    if name not in _CLASSES:
        raise SchedulerConfigError(f"sampling.scheduler={name!r}: expected one of {SCHEDULERS}")
    if name == "ddim":
        return _DDIM(name, scheduler_config, num_steps, eta)
    if eta != 0:
        raise SchedulerConfigError(f"sampling.eta={eta!r} applies to the DDIM scheduler only, not {name!r}")
    return _CLASSES[name](name, scheduler_config, num_steps)
