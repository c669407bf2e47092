"""The UNet parameters the sampler runs with: the loaded folder's, or those with a LoRA merged in.

    check_lora_settings(config.sampling.lora_path, config.sampling.lora_scale)   # before loading
    unet_params = sampling_unet_params(sd, config.sampling.lora_path, config.sampling.lora_scale)

A sampling LoRA (e.g. LCM-LoRA, which with the LCM scheduler makes candidates in 4-8 steps at
guidance 1, the authors' SDXL recipe) changes only the sampled candidates: training and export
start from the folder's own weights.
"""

from __future__ import annotations

import math
from typing import Any

from agfsync_jax import storage
from agfsync_jax.base_model import folder_identity
from agfsync_jax.models.loading import StableDiffusion


def check_lora_settings(lora_path: str, lora_scale: float) -> None:
    """Fails before any model is loaded if sampling.lora_path / sampling.lora_scale are unusable."""
    if not math.isfinite(lora_scale):
        raise ValueError(f"sampling.lora_scale={lora_scale!r} must be a finite number")
    if not lora_path:
        if lora_scale != 1.0:
            raise ValueError(f"sampling.lora_scale={lora_scale!r} has no effect without sampling.lora_path")
        return
    if not storage.as_path(lora_path).exists():
        raise FileNotFoundError(f"sampling.lora_path={lora_path!r}: no such file or folder")


def lora_identity(lora_path: str) -> dict[str, str]:
    """The sampling LoRA's part of the `sample` stage fingerprint: a changed file is a changed run."""
    if not lora_path:
        return {}
    if not storage.as_path(lora_path).exists():
        raise FileNotFoundError(f"sampling.lora_path={lora_path!r}: no such file or folder")
    return {"sampling.lora_identity": folder_identity(lora_path)}


def sampling_unet_params(sd: StableDiffusion, lora_path: str, lora_scale: float) -> Any:
    """The UNet parameter tree to sample with (host arrays): `sd`'s, with the LoRA at `lora_path`
    merged in at `lora_scale` when one is given."""
    if not lora_path:
        return sd.unet.params
    from agfsync_jax.lora import load_lora, merge_lora

    return merge_lora(sd.unet.params, load_lora(lora_path, sd.unet.config), lora_scale)
