"""LoRA adapters on the Flax UNet: a tree of (a, b) pairs, applied on the fly or merged.

    adapters = init_adapters(unet_params, unet_config, rank=8, targets=("attention",), rng=key)
    with flax.linen.intercept_methods(interceptor(scale=alpha / rank)):
        out = unet.apply(variables(WithAdapters(unet_params, adapters)), x_t, t, context)
    merged = merge(unet_params, adapters, scale)        # host numpy, same tree as unet_params

The adapter tree mirrors the UNet's parameter tree down to each adapted Dense or Conv module and
holds {"lora_a": a, "lora_b": b} there (Flax layouts, `keys` module docstring); it is passed to
`apply` as the variable collection "lora", so it follows the modules through flax's lifted
transforms (e.g. per-layer remat) like any other variable. The interceptor adds
`scale * b(a(x))` to the output of every Dense/Conv that finds adapters in its scope, where
`a(x)` is the module's own operation (same strides, padding, dtype) with `a` as kernel: the
low-rank path runs in the compute dtype beside the base layer, so a small update is not rounded
away in a bfloat16 kernel, and the base kernels are never copied. Without a "lora" collection
(the reference, i.e. base with adapters off) the interceptor changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from agfsync_jax.lora import keys

COLLECTION = "lora"
A, B = "lora_a", "lora_b"


@flax.struct.dataclass
class WithAdapters:
    """The policy of a LoRA run: frozen base parameters plus the trained adapters."""

    base: Any
    adapters: Any


def adapter_scale(rank: int, alpha: float = 0.0) -> float:
    """alpha / rank, the factor on b(a(x)); alpha 0 means alpha = rank (scale 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1")
    return (float(alpha) or rank) / rank


def variables(params: Any) -> dict[str, Any]:
    """Flax variables for `unet.apply`: base + "lora" collection, or the plain parameters."""
    if isinstance(params, WithAdapters):
        return {"params": params.base, COLLECTION: params.adapters}
    return {"params": params}


def interceptor(scale: float) -> Callable[..., Any]:
    """A flax method interceptor adding `scale * b(a(x))` to every adapted Dense/Conv output."""
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv))
                or not module.has_variable(COLLECTION, A)):
            return out
        a, b = module.get_variable(COLLECTION, A), module.get_variable(COLLECTION, B)
        # The module itself with `a` as its kernel: its strides, padding and dtype carry over.
        down = module.clone(parent=None, features=a.shape[-1], use_bias=False)
        low = down.apply({"params": {"kernel": a}}, args[0])
        return out + (scale * jnp.dot(low, b.astype(low.dtype))).astype(out.dtype)
    return intercept


def modules(adapters: Any, where: str = "adapters") -> dict[tuple[str, ...], tuple[Any, Any]]:
    """{Flax module path: (a, b)} of an adapter tree, checking that it is one."""
    flat = flatten_dict(adapters)
    out: dict[tuple[str, ...], list[Any]] = {}
    for path, leaf in flat.items():
        if path[-1] not in (A, B):
            raise ValueError(f"{where}: {'/'.join(path)} is not a LoRA adapter leaf ({A!r} or {B!r}); "
                             "is this a full UNet parameter tree?")
        out.setdefault(path[:-1], [None, None])[path[-1] == B] = leaf
    missing = ["/".join(p) for p, (a, b) in out.items() if a is None or b is None]
    if missing:
        raise ValueError(f"{where}: adapters without both {A} and {B}: {missing[:5]}")
    return {p: (a, b) for p, (a, b) in out.items()}


def is_adapter_tree(tree: Any) -> bool:
    """Whether every leaf of `tree` is an adapter leaf (lora_a / lora_b)."""
    flat = flatten_dict(tree) if isinstance(tree, Mapping) else {}
    return bool(flat) and all(path[-1] in (A, B) for path in flat)


def init_adapters(unet_params: Any, unet_config: Mapping[str, Any], rank: int, targets: Sequence[str],
                  rng: jax.Array) -> dict[str, Any]:
    """Fresh float32 adapters (host numpy) on the layers of `targets` (keys.TARGET_GROUPS).

    As diffusers' Diffusion-DPO LoRA example (peft `init_lora_weights="gaussian"`): a ~ N(0, 1/rank^2),
    b = 0, so the adapted UNet starts exactly at the base.
    """
    if rank < 1:
        raise ValueError(f"train.lora.rank={rank} must be >= 1 to train adapters")
    layout = keys.unet_layout(unet_config)
    kernels = flatten_dict(unet_params)
    targeted = keys.select_modules(layout, targets)
    if not targeted:
        raise ValueError(f"train.lora.targets={tuple(targets)} match no layer of this UNet")
    flat = {}
    for module, key in zip(targeted, jax.random.split(rng, len(targeted))):
        path = layout.flax_path[module]
        kernel = kernels.get(path + ("kernel",))
        if kernel is None:
            raise keys.LoraKeyError(f"unet parameters have no {'/'.join(path)}/kernel for {module}")
        a_shape = tuple(kernel.shape[:-1]) + (rank,)
        flat[path + (A,)] = np.asarray(jax.random.normal(key, a_shape, jnp.float32)) / rank
        flat[path + (B,)] = np.zeros((rank, kernel.shape[-1]), np.float32)
    return unflatten_dict(flat)


def merge(unet_params: Any, adapters: Any, scale: float = 1.0, where: str = "adapters") -> Any:
    """`unet_params` with every adapted kernel replaced by kernel + scale * a b (host numpy).

    Accumulates in float32 (or wider) and returns each kernel in its own dtype. Raises when an
    adapter has no kernel of matching shape.
    """
    flat = {k: np.asarray(v) for k, v in flatten_dict(unet_params).items()}
    for path, (a, b) in modules(adapters, where).items():
        kernel_key = path + ("kernel",)
        kernel = flat.get(kernel_key)
        a, b = np.asarray(a), np.asarray(b)
        if kernel is None or kernel.shape != keys.delta_shape(a.shape, b.shape):
            got = "none" if kernel is None else f"shape {kernel.shape}"
            raise keys.LoraKeyError(f"{where}: adapter {'/'.join(path)} (a{a.shape}, b{b.shape}) has no matching "
                                    f"kernel in the UNet ({got})")
        acc = np.promote_types(kernel.dtype, np.float32)
        delta = np.tensordot(a.astype(acc), b.astype(acc), axes=1)
        flat[kernel_key] = (kernel.astype(acc) + np.asarray(scale, acc) * delta).astype(kernel.dtype)
    return unflatten_dict(flat)
