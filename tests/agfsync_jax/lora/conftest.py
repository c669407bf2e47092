"""LoRA-test helpers (imported by this folder's tests): LoRA files made by peft/diffusers' own
saving code, UNet inputs, and the PyTorch and Flax UNet outputs on them."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from agfsync_jax.models import loading

# Linear and conv layers of every kind the tiny UNets have (peft matches by name suffix).
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]
RANK, ALPHA = 4, 8


def peft_lora_unet(folder: Path, seed: int = 0, targets=PEFT_TARGETS, rank=RANK, alpha=ALPHA):
    """diffusers' PyTorch UNet of `folder` with a peft LoRA adapter of random (non-zero) weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return unet


def save_peft_lora(unet, out: Path, family: str, with_metadata: bool = True, old_layout: bool = False) -> Path:
    """Saves the adapter with diffusers' `save_lora_weights` from peft's state dict.

    `old_layout` first renames it with `convert_state_dict_to_diffusers`, as diffusers' LoRA
    training scripts do: attention layers then get the older `to_q.lora.down.weight` names, the
    rest keep peft's. diffusers 0.39 converts a file's keys only when its first key is not in peft
    layout, so a file that mixes both (attention plus other targets) loses its attention LoRA
    in `pipe.load_lora_weights` without an error; use it with attention-only targets.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(unet)
    if old_layout:
        layers = convert_state_dict_to_diffusers(layers)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()} if with_metadata else {}
    cls.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True, **kwargs)
    return out


def unet_inputs(config: dict, seed: int = 1, batch: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal((batch, 4, 16, 16)).astype(np.float32),
              "t": np.array([5, 800][:batch], np.int32),
              "ctx": rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(np.float32),
              "added": None}
    dims = loading.unet_added_cond_dims(config)
    if dims is not None:
        inputs["added"] = {"text_embeds": rng.standard_normal((batch, dims[0])).astype(np.float32),
                           "time_ids": np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (batch, 1))}
    return inputs


def tanh_gelu(unet):
    """diffusers' Flax port uses the tanh approximation of GELU in GEGLU (flax.linen.gelu's
    default), the PyTorch model the exact one; a LoRA that moves activations far (as these random
    ones do) makes that difference visible, so the oracle uses the same approximation."""
    import types

    import torch
    from diffusers.models.activations import GEGLU

    for module in unet.modules():
        if isinstance(module, GEGLU):
            module.gelu = types.MethodType(lambda self, g: torch.nn.functional.gelu(g, approximate="tanh"), module)
    return unet


def torch_unet_out(unet, inputs: dict) -> np.ndarray:
    import torch

    tanh_gelu(unet)
    added = None if inputs["added"] is None else {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
    with torch.no_grad():
        return unet(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["t"]).long(),
                    torch.from_numpy(inputs["ctx"]), added_cond_kwargs=added).sample.numpy()


_COMPILED: dict = {}


def flax_unet_out(module, variables: dict, inputs: dict, scale: float | None = None) -> np.ndarray:
    """The Flax UNet's output; with `scale`, adapters in `variables` are applied on the fly."""
    import flax.linen as nn

    from agfsync_jax import lora

    def run(variables, x, t, ctx, added):
        if scale is None:
            return module.apply(variables, x, t, ctx, added).sample
        with nn.intercept_methods(lora.interceptor(scale)):
            return module.apply(variables, x, t, ctx, added).sample
    # One compilation per model and mode (the tests reuse them); arguments go through jit: the
    # Flax UNet wraps a non-jax `timesteps` in an extra dimension.
    fn = _COMPILED.setdefault((id(module), scale), jax.jit(run))
    return np.asarray(fn(variables, inputs["x"], inputs["t"], inputs["ctx"], inputs["added"]))
