"""Where LoRA weights go: PyTorch module names of diffusers' UNet <-> the Flax UNet's kernels.

    layout = unet_layout(unet_config)            # from the model folder's unet/config.json
    layout.flax_path["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    # -> ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
    select_modules(layout, ("attention",))      # the module names a target group covers

A LoRA file names the PyTorch modules it adapts (`<module>.lora_A.weight` after diffusers'
conversions, see `files`); every such module is a `torch.nn.Linear` or `Conv2d` of
`UNet2DConditionModel`, whose Flax counterpart is the `kernel` at the path diffusers' own
PyTorch->Flax renaming rules give (`rename_key`, `rename_key_and_reshape_tensor`, the rules the
model loader uses). The layout is built from the PyTorch UNet on the meta device, so it costs no
memory even for SDXL.

The pair (A, B) of a module becomes the Flax-layout pair (a, b) with
`kernel + scale * tensordot(a, b, 1)` the merged kernel:
* Linear: A (r, in), B (out, r)  ->  a = A^T (in, r), b = B^T (r, out);
* Conv2d: A (r, in, kh, kw), B (out, r, 1, 1)  ->  a (kh, kw, in, r) (HWIO, as the kernel),
  b (r, out). peft and kohya both make B a 1x1 convolution, so the composition is one
  convolution with the product kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agfsync_jax.errors import InputError

# Target groups for training (`train.lora.targets`): regular expressions over PyTorch module names.
# "attention" is what diffusers' Diffusion-DPO LoRA example adapts (to_q, to_k, to_v, to_out.0).
TARGET_GROUPS: dict[str, str] = {
    "attention": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "feed_forward": r"\.ff\.net\.(0\.proj|2)$",
    "resnet_convs": r"\.resnets\.\d+\.conv[12]$",
}


class LoraKeyError(InputError):
    """A LoRA weight names no UNet layer, or one of another shape; the message names file and key."""


@dataclasses.dataclass(frozen=True)
class UnetLayout:
    """The Linear and Conv2d layers of one UNet config."""

    pt_shape: Mapping[str, tuple[int, ...]]  # PyTorch module name -> its weight's shape
    flax_path: Mapping[str, tuple[str, ...]]  # PyTorch module name -> Flax module path (kernel's parent)

    @functools.cached_property
    def module_name(self) -> dict[tuple[str, ...], str]:
        """Flax module path -> PyTorch module name (the inverse of `flax_path`)."""
        return {path: name for name, path in self.flax_path.items()}


@functools.lru_cache(maxsize=8)
def _layout_from_json(config_json: str) -> UnetLayout:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes, paths = {}, {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        shape = tuple(module.weight.shape)
        # A zero-stride stand-in: the rules only look at names, ndim and transpose views.
        stub = np.broadcast_to(np.float32(0), shape)
        flax_key, _ = rename_key_and_reshape_tensor(tuple(rename_key(f"{name}.weight").split(".")), stub, {})
        if flax_key[-1] != "kernel":
            raise AssertionError(f"diffusers' renaming maps {name}.weight to {flax_key}, not a kernel")
        shapes[name], paths[name] = shape, tuple(flax_key[:-1])
    return UnetLayout(pt_shape=shapes, flax_path=paths)


def unet_layout(unet_config: Mapping[str, Any]) -> UnetLayout:
    """The layout of `UNet2DConditionModel.from_config(unet_config)` (cached per config)."""
    return _layout_from_json(json.dumps(dict(unet_config), sort_keys=True, default=str))


def parse_targets(targets: str | Sequence[str], field: str = "train.lora.targets") -> tuple[str, ...]:
    """"attention,feed_forward" -> ("attention", "feed_forward"), checked against TARGET_GROUPS."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in names if t not in TARGET_GROUPS]
    if not names or unknown:
        raise ValueError(f"{field}={targets!r}: expected a comma-separated subset of {sorted(TARGET_GROUPS)}")
    return tuple(dict.fromkeys(names))


def select_modules(layout: UnetLayout, targets: Sequence[str]) -> list[str]:
    """PyTorch module names covered by the target groups, in the UNet's module order."""
    patterns = [re.compile(TARGET_GROUPS[t]) for t in parse_targets(targets)]
    return [name for name in layout.pt_shape if any(p.search(name) for p in patterns)]


def to_flax_pair(down: np.ndarray, up: np.ndarray, module: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch (A, B) of one module -> Flax (a, b); see the module docstring for the layouts."""
    if down.ndim == 2 and up.ndim == 2:
        return down.T, up.T
    if down.ndim == 4 and up.ndim == 4:
        if up.shape[2:] != (1, 1):
            raise LoraKeyError(f"{where}: {module}.lora_B has kernel size {up.shape[2:]}; only 1x1 up "
                               "projections (peft and kohya LoRA) are supported")
        return down.transpose(2, 3, 1, 0), up[:, :, 0, 0].T
    raise LoraKeyError(f"{where}: {module} has LoRA weights of shapes {down.shape} and {up.shape}; "
                       "expected two 2-D (Linear) or two 4-D (Conv2d) tensors")


def to_pytorch_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flax (a, b) -> PyTorch (A, B), the inverse of `to_flax_pair`."""
    if a.ndim == 2:
        return a.T, b.T
    return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]


def delta_shape(a_shape: Sequence[int], b_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the merged kernel update tensordot(a, b, 1)."""
    return tuple(a_shape[:-1]) + (b_shape[-1],)


def check_module(layout: UnetLayout, module: str, a_shape: Sequence[int], b_shape: Sequence[int],
                 where: str) -> tuple[str, ...]:
    """The Flax path of `module`, after checking that the pair fits its kernel."""
    if module not in layout.flax_path:
        close = [m for m in layout.flax_path if m.endswith(module.split(".")[-1])][:3]
        raise LoraKeyError(f"{where}: LoRA key {module!r} names no Linear or Conv2d layer of this UNet"
                           + (f" (layers with that name: {close} ...)" if close else ""))
    pt_shape = layout.pt_shape[module]
    kernel = (pt_shape[2], pt_shape[3], pt_shape[1], pt_shape[0]) if len(pt_shape) == 4 else pt_shape[::-1]
    if a_shape[-1] != b_shape[0] or delta_shape(a_shape, b_shape) != tuple(kernel):
        raise LoraKeyError(f"{where}: LoRA of {module!r} has rank shapes a{tuple(a_shape)} b{tuple(b_shape)}, "
                           f"which do not fit the layer's weight of shape {pt_shape} (a LoRA for another "
                           "model?)")
    return layout.flax_path[module]
