"""FLOPs per DPO pair and per sampled image of a config's real programs, traced, not compiled.

    python -m benchmarks.traced_flops --config=configs/sd15.py [--override=train.remat=False ...]

Traces (`jax.jit(...).trace`, no compile, nothing allocated) the train step and the sampling
program that `agfsync-jax train` / `sample` build for the config's full-size architecture on a
one-device CPU mesh, with one pair / one image per call, and counts their matmul + convolution
FLOPs with every loop multiplied by its trip count (agfsync_jax/plan/flop_count.py, the count
`agfsync-jax plan` reports). FLOPs per pair and per image do not depend on the mesh. Writes
benchmarks/results/traced_flops-<config>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _override(config: Any, assignment: str) -> None:
    key, value = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    old = node[leaf]
    node[leaf] = type(old)(value == "True") if isinstance(old, bool) else type(old)(value)


def traced_flops(config: Any) -> dict[str, Any]:
    import tempfile

    from agfsync_jax import sharding
    from agfsync_jax.plan import compile_plan, flop_count

    warnings.filterwarnings("ignore")
    config.train.batch_size = int(config.train.grad_accum_steps)  # one pair per microbatch
    config.sampling.batch_size, config.sampling.microbatch = 1, 1
    config.mesh.fsdp = 1
    with tempfile.TemporaryDirectory() as scratch:
        sd = compile_plan.abstract_model(config, compile_plan.model_folder(config, Path(scratch)))
        mesh = sharding.make_mesh(config.mesh)
        out: dict[str, Any] = {}
        start = time.perf_counter()
        setup = compile_plan.build_training(config, sd, mesh)
        batch = compile_plan.train_batch_shapes(config, sd, mesh)
        count = flop_count.count(setup.train_step.trace(setup.abstract_state, setup.frozen, batch).jaxpr)
        out["train_flops_per_pair"] = count.total / config.train.batch_size
        out["train_breakdown"] = vars(count)
        count = flop_count.count(compile_plan.sampling_program(config, sd, mesh).trace().jaxpr)
        out["sample_flops_per_image"] = count.total
        out["sample_breakdown"] = vars(count)
        out["trace_s"] = time.perf_counter() - start
    return out


def main() -> None:
    import importlib.util

    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE, e.g. train.remat=False")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("plan_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for assignment in args.override:
        _override(config, assignment)
    result = {"command": " ".join([sys.executable.split("/")[-1], "-m", "benchmarks.traced_flops"] + sys.argv[1:]),
              "config": args.config, "overrides": args.override, **traced_flops(config)}
    name = f"traced_flops-{Path(args.config).stem}" + (f"-{args.tag}" if args.tag else "")
    path = common.write_result(name, result)
    print(f"{args.config} {args.override}: {result['train_flops_per_pair']:.4g} FLOP per pair, "
          f"{result['sample_flops_per_image']:.4g} FLOP per image (traced in {result['trace_s']:.0f} s) -> {path}")


if __name__ == "__main__":
    main()
