"""Stage `plan`: will this config fit these TPU slices? Asked of the real TPU compiler.

    agfsync-jax plan --config=configs/sdxl.py --topology=v5p:2x2x1[,v5e-8,...] [--plan_out=plan.json]

For every topology, compiles (never runs) the run's train step and sampling program for the
slice's devices with libtpu, and prints per device: arguments, outputs, temporaries and peak
HBM against the chip's, FLOPs per step and per pair / image, and a wall time derived from those
FLOPs at an assumed model-FLOPs utilisation (`plan.assumed_mfu`; an assumption, labelled as one).
Exits 0 when every program fits, 1 when one does not (naming what to change), 2 when the plan
cannot be made (libtpu missing or held by another process, a topology the config cannot use).

JAX's default backend stays the CPU: nothing touches an accelerator, and the plan works on a
machine without one. libtpu is taken by this process and released when it exits. No workdir is
needed (`--workdir` is ignored); the model is `model.path`'s configs (no weights are read), the
shipped `plan.architecture`, or the tiny model.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from agfsync_jax import atomic_io

_EXIT_DOES_NOT_FIT = 1
_EXIT_CANNOT_PLAN = 2


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _hours(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 600 else f"{seconds / 3600:.3g} h"


def _describe(config: Any, plan: Any, chip: Any, mfu: float) -> list[str]:
    from agfsync_jax.plan.advice import what_to_change
    from agfsync_jax.plan.compile_plan import TRAIN

    lines = [f"  {plan.program}: {plan.per_device}"]
    if plan.program == TRAIN:
        t = config.train
        remat = f"remat {t.remat_scope} ({t.remat_policy})" if t.remat else "no remat"
        lines.append(f"    compute {config.model.compute_dtype}, {remat}, attention {t.attention}, "
                     f"text {t.text_encoding}")
    else:
        s = config.sampling
        lines.append(f"    compute {config.model.compute_dtype}, attention {s.attention}, params {s.shard_params}")
    if plan.memory is not None:
        m = plan.memory
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"    per device: arguments {_gib(m['argument'])} (donated {_gib(m['alias'])}), outputs "
                     f"{_gib(m['output'])}, temporaries {_gib(m['temp'])}, code {_gib(m['generated_code'])} -> "
                     f"peak {_gib(m['peak'])} of {_gib(plan.hbm_bytes)}: {verdict}")
    if plan.error is not None:
        lines.append(f"    DOES NOT FIT: the TPU compiler refused it: {plan.error}")
    compiler = ("refused" if plan.compiler_flops_per_device is None
                else f"{plan.compiler_flops_per_device:.3e} per device, loop bodies once")
    lines.append(f"    FLOPs (matmul + conv, loops by trip count): {plan.flops_per_device:.3e} per device per "
                 f"call, {plan.flops_per_call:.3e} per call, {plan.flops_per_item:.3e} per {plan.item} "
                 f"[XLA cost analysis: {compiler}]")
    seconds = plan.seconds_per_call(chip.peak_bf16_flops, mfu)
    what = (f"{_hours(seconds * int(config.train.steps))} for train.steps={int(config.train.steps)}"
            if plan.program == TRAIN else f"{_hours(seconds / plan.items_per_call * plan.num_devices)} "
                                            f"per image per chip")
    lines.append(f"    ASSUMING {mfu:.0%} MFU of {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip "
                 f"(not measured): {_hours(seconds)} per call, {what}")
    if not plan.fits:
        lines.append("    to make it fit, try (most effective first):")
        lines += [f"      {advice}" for advice in what_to_change(config, plan)]
    return lines


def plan(config: Any, topologies: str, out: str | None = None) -> int:
    """Plans `config` on each of `topologies`; prints the plan, writes `out` (JSON); exit code."""
    from agfsync_jax.plan import topology as topology_lib

    try:
        topos = topology_lib.parse_topologies(topologies)
    except topology_lib.TopologyError as e:
        print(f"plan: {e}", file=sys.stderr)
        return _EXIT_CANNOT_PLAN
    # Compile-only: JAX must not take an accelerator (or libtpu's TPU runtime) for itself.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_platforms", "cpu")
    from agfsync_jax import sharding
    from agfsync_jax.plan import compile_plan

    programs = [p.strip() for p in str(config.plan.programs).split(",") if p.strip()]
    unknown = set(programs) - set(compile_plan.PROGRAMS)
    if unknown or not programs:
        print(f"plan: plan.programs={config.plan.programs!r}; expected a comma-separated subset of "
              f"{compile_plan.PROGRAMS}", file=sys.stderr)
        return _EXIT_CANNOT_PLAN
    mfu = float(config.plan.assumed_mfu)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "assumed_mfu": mfu, "topologies": []}
    code = 0
    with tempfile.TemporaryDirectory(prefix="agfsync-plan-") as scratch:
        folder = compile_plan.model_folder(config, Path(scratch))
        sd = compile_plan.abstract_model(config, folder)
        for topo in topos:
            chip = topo.chip
            try:
                devices = topology_lib.compile_only_devices(topo)
            except topology_lib.LibtpuUnavailable as e:
                print(f"plan: {e}", file=sys.stderr)
                return _EXIT_CANNOT_PLAN
            hbm = int(float(config.plan.hbm_gib) * 2**30) if float(config.plan.hbm_gib) > 0 else chip.hbm_bytes
            print(f"plan {topo.name} ({topo.accelerator_type}: {topo.num_chips} x {chip.device_kind}, "
                  f"{chip.hbm_published} HBM per chip, {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak; "
                  f"{chip.source}); model {folder}")
            entry: dict[str, Any] = {"topology": topo.name, "accelerator_type": topo.accelerator_type,
                                     "chips": topo.num_chips, "chip": chip.name, "hbm_bytes": hbm,
                                     "peak_bf16_flops": chip.peak_bf16_flops, "programs": []}
            report["topologies"].append(entry)
            try:
                mesh = sharding.make_mesh(config.mesh, devices=devices)
                planned = []
                for program in programs:
                    fn = compile_plan.plan_train_step if program == compile_plan.TRAIN else compile_plan.plan_sampler
                    planned.append(fn(config, sd, mesh, hbm))
            except ValueError as e:  # the config's layout does not apply to this slice
                print(f"  cannot plan this config on {topo.name}: {e}")
                entry["error"] = str(e)
                code = max(code, _EXIT_CANNOT_PLAN)
                continue
            print(f"  mesh {dict(mesh.shape)}")
            for p in planned:
                print("\n".join(_describe(config, p, chip, mfu)))
                entry["programs"].append(p.to_json())
                if not p.fits:
                    code = max(code, _EXIT_DOES_NOT_FIT)
    if out:
        atomic_io.atomic_write_json(Path(out), report)
    print("plan: everything fits" if code == 0 else
          "plan: some programs do not fit (see above)" if code == _EXIT_DOES_NOT_FIT else "plan: incomplete")
    return code


def run(config: Any, workdir: str | None) -> None:
    """Stage entry (`agfsync-jax plan`): reads --topology and --plan_out; exits with plan's code."""
    from absl import flags

    del workdir  # the plan reads and writes no work directory
    topologies = flags.FLAGS["topology"].value
    if not topologies:
        print("plan: --topology is required, e.g. --topology=v5p:2x2x1 or --topology=v5e-8,v6e-8", file=sys.stderr)
        sys.exit(_EXIT_CANNOT_PLAN)
    code = plan(config, topologies, flags.FLAGS["plan_out"].value)
    if code:
        sys.exit(code)
