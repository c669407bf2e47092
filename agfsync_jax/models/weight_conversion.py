"""PyTorch state dicts -> Flax parameter trees, strictly.

We reuse diffusers' and transformers' own renaming rules (`rename_key`,
`rename_key_and_reshape_tensor`) but differ from upstream in two ways that matter here:
- the target tree's shapes come from `jax.eval_shape` of the module's init, so no random
  parameters are ever materialised (upstream initialises the whole model just to read shapes);
- a missing, unexpected or mis-shaped parameter is an error naming the component (upstream
  only warns, which silently leaves random weights in a "pretrained" model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# PyTorch buffers that some checkpoints carry and that have no Flax parameter.
_IGNORED_SUFFIXES = ("position_ids",)


class ParameterMismatchError(ValueError):
    pass


def _check_and_unflatten(converted: dict[tuple, np.ndarray], expected: Mapping[tuple, Any],
                         where: str) -> dict:
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = [(k, converted[k].shape, tuple(expected[k].shape))
                   for k in set(converted) & set(expected) if converted[k].shape != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        def show(keys):
            keys = ["/".join(map(str, k)) for k in keys]
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing parameters: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected parameters: {show(unexpected)}")
        if wrong_shape:
            parts.append("wrong shapes: " + ", ".join(
                f"{'/'.join(map(str, k))} {got} != {want}" for k, got, want in wrong_shape[:8]))
        raise ParameterMismatchError(f"{where}: weights do not match the model config; " + "; ".join(parts))
    return unflatten_dict({k: np.ascontiguousarray(v) for k, v in converted.items()})


def expected_param_shapes(init_fn, *args) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Flattened {path: ShapeDtypeStruct} of `init_fn(*args)` without computing anything."""
    shapes = jax.eval_shape(init_fn, *args)
    return flatten_dict(shapes.unfreeze() if hasattr(shapes, "unfreeze") else shapes)


def convert_diffusers_state_dict(state: Mapping[str, np.ndarray],
                                 expected: Mapping[tuple, Any], where: str) -> dict:
    """A diffusers PyTorch UNet/VAE state dict -> Flax params matching `expected` exactly."""
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    converted = {}
    for pt_key, tensor in state.items():
        if pt_key.endswith(_IGNORED_SUFFIXES):
            continue
        pt_tuple = tuple(rename_key(pt_key).split("."))
        flax_key, flax_tensor = rename_key_and_reshape_tensor(pt_tuple, tensor, expected)
        converted[flax_key] = flax_tensor
    return _check_and_unflatten(converted, expected, where)


def convert_transformers_state_dict(state: Mapping[str, np.ndarray], expected: Mapping[tuple, Any],
                                    model_prefix: str, where: str) -> dict:
    """A transformers PyTorch state dict (CLIP text encoders) -> Flax params matching `expected`."""
    from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

    converted = {}
    for pt_key, tensor in state.items():
        if pt_key.endswith(_IGNORED_SUFFIXES):
            continue
        flax_key, flax_tensor = rename_key_and_reshape_tensor(
            tuple(pt_key.split(".")), tensor, expected, model_prefix)
        converted[flax_key] = flax_tensor
    return _check_and_unflatten(converted, expected, where)
