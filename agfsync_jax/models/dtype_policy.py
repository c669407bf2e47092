"""Parameter and compute dtypes.

Master weights stay float32 (the optimizer's updates at lr 5e-7 vanish in bf16); compute may be
bfloat16, which the diffusers Flax modules take as their `dtype` field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str, field: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"{field}: unknown dtype {name!r}, expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, model_config: Any) -> "DtypePolicy":
        return cls(param_dtype=parse_dtype(model_config.param_dtype, "model.param_dtype"),
                   compute_dtype=parse_dtype(model_config.compute_dtype, "model.compute_dtype"))

    def cast_params(self, params: Any) -> Any:
        """Casts floating leaves to the parameter dtype; integer leaves are left alone."""
        def cast(x):
            return x.astype(self.param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return jax.tree_util.tree_map(cast, params)
