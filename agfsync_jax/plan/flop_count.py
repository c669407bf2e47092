"""Matmul and convolution FLOPs of a traced program, with every loop counted by its trip count.

    flops = jaxpr_flops(jax.jit(step).trace(*abstract_args).jaxpr)

XLA's cost analysis (what `compiled.cost_analysis()` reports, on TPU as on CPU) counts the body of
a while loop once, whatever its trip count: the sampler's denoising loop, its loop over
per-device chunks and the train step's gradient-accumulation scan would all be undercounted by
their trip counts. This counter walks the jaxpr instead, where those loops are `scan`s with a
static length, and multiplies. It counts what dominates a UNet (2 x multiply-accumulates of
`dot_general` and `conv_general_dilated`, forward, backward and rematerialised recomputation
alike, since all of them are in the traced program), and the kernels of `pallas_call`s (the
flash-attention kernels: their block computation times the grid). Elementwise work, norms and
softmax are left out, as in benchmarks/flops.py. A `while` with a data-dependent trip count is
counted once and reported in `unknown_trip_counts`.

Transposed convolutions (gradients of strided convolutions) are counted on their dilated input,
zeros included, as XLA does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.extend import core as jex_core


@dataclasses.dataclass
class FlopCount:
    dot: float = 0.0
    conv: float = 0.0
    pallas: float = 0.0  # FLOPs inside Pallas kernels (e.g. flash attention)
    unknown_trip_counts: int = 0  # while loops counted once

    @property
    def total(self) -> float:
        return self.dot + self.conv + self.pallas

    def add(self, other: "FlopCount", times: float = 1.0) -> None:
        self.dot += times * other.dot
        self.conv += times * other.conv
        self.pallas += times * other.pallas
        self.unknown_trip_counts += other.unknown_trip_counts


def _dot_flops(eqn: Any) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn: Any) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    # Every output element takes (input features per group x kernel window) multiply-adds.
    return 2.0 * math.prod(out) * math.prod(rhs) / out_features


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                found.append(item)
    return found


def _pallas_grid(params: dict[str, Any]) -> int:
    grid = getattr(params["grid_mapping"], "grid", ())
    return math.prod(int(g) for g in grid) if grid else 1


def count(jaxpr: Any) -> FlopCount:
    """FlopCount of a `Jaxpr` or `ClosedJaxpr` (the global program; shard_map bodies times
    the number of devices that run them)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = FlopCount()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total.dot += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total.conv += _conv_flops(eqn)
        elif name == "scan":
            total.add(count(eqn.params["jaxpr"]), times=int(eqn.params["length"]))
        elif name == "cond":  # one branch runs: count the most expensive
            branches = [count(b) for b in eqn.params["branches"]]
            total.add(max(branches, key=lambda c: c.total))
        elif name == "while":
            total.add(count(eqn.params["body_jaxpr"]))
            total.add(count(eqn.params["cond_jaxpr"]))
            total.unknown_trip_counts += 1
        elif name == "pallas_call":
            inner = count(eqn.params["jaxpr"])
            total.pallas += _pallas_grid(eqn.params) * inner.total
        elif name == "shard_map":
            devices = math.prod(eqn.params["mesh"].shape.values())
            total.add(count(eqn.params["jaxpr"]), times=devices)
        else:  # pjit, closed_call, checkpoint (remat), custom_vjp / custom_jvp calls, ...
            for sub in _sub_jaxprs(eqn.params):
                total.add(count(sub))
    return total
