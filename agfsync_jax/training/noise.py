"""The forward diffusion process used for training: q(x_t | x_0) and the regression target.

The schedule comes from the base model's `scheduler/scheduler_config.json`, whatever sampler
class it names: only the training quantities (betas -> alphas_cumprod, prediction type) matter
here. Sampling-time settings (timestep spacing, offsets) do not affect training.

Everything is pure; timesteps and noise are arguments, never drawn here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")


@flax.struct.dataclass
class NoiseSchedule:
    alphas_cumprod: jax.Array  # (T,) float32
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def _betas(cfg: Mapping[str, Any]) -> np.ndarray:
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], np.float64)
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine alpha-bar, betas capped at 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"scheduler beta_schedule {kind!r} is not supported for training "
                     "(linear, scaled_linear, squaredcos_cap_v2, or trained_betas)")


def schedule_from_config(scheduler_config: Mapping[str, Any]) -> NoiseSchedule:
    """The training schedule of a diffusers scheduler config (any scheduler class)."""
    if scheduler_config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler rescale_betas_zero_snr=True is not supported for training")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; "
                         f"expected one of {PREDICTION_TYPES}")
    # float64 on the host, then float32: as accurate as diffusers' float32 cumprod or better.
    alphas_cumprod = np.cumprod(1.0 - _betas(scheduler_config)).astype(np.float32)
    return NoiseSchedule(jnp.asarray(alphas_cumprod), prediction_type)


def _coefficients(schedule: NoiseSchedule, timesteps: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    acp = schedule.alphas_cumprod[timesteps]
    shape = acp.shape + (1,) * (ndim - acp.ndim)
    return jnp.sqrt(acp).reshape(shape), jnp.sqrt(1.0 - acp).reshape(shape)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; `timesteps` index the leading batch dims."""
    a, s = _coefficients(schedule, timesteps, x0.ndim)
    return a * x0 + s * noise


def regression_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
                      timesteps: jax.Array) -> jax.Array:
    """What the UNet is trained to output: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
    if schedule.prediction_type == "epsilon":
        return noise
    a, s = _coefficients(schedule, timesteps, x0.ndim)
    return a * noise - s * x0


def sample_timesteps(rng: jax.Array, schedule: NoiseSchedule, shape: tuple[int, ...]) -> jax.Array:
    """t ~ U{0, ..., T-1} as int32."""
    return jax.random.randint(rng, shape, 0, schedule.num_train_timesteps, dtype=jnp.int32)
