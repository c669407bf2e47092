"""Multi-process start-up: `jax.distributed.initialize` from the launcher's environment.

Call `initialize()` once, before anything touches a JAX device. Sources, in order:

1. explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID
   (and optionally JAX_LOCAL_DEVICE_IDS, read by JAX itself); what our launchers set;
2. SLURM: a job step with more than one task (SLURM_NTASKS > 1); JAX reads SLURM_* itself;
3. JAX_DISTRIBUTED_AUTO=1: JAX's own cluster detection (Cloud TPU pods, Open MPI, k8s);
4. none of these: a single process, and this is a no-op.

On CPU, cross-process collectives use gloo (the default of jax 0.10's
`jax_cpu_collectives_implementation`; set here explicitly so that a changed default cannot
silently break multi-process CPU runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import logging


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launcher_arguments(env: Mapping[str, str] | None = None) -> dict[str, object] | None:
    """Keyword arguments for `jax.distributed.initialize`, or None for a single process."""
    env = os.environ if env is None else env
    explicit = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k in env]
    if explicit:
        if len(explicit) != 3:
            raise ValueError(f"multi-process launch needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
                             f"and JAX_PROCESS_ID together; only {explicit} are set")
        num_processes = _int_env(env, "JAX_NUM_PROCESSES")
        if num_processes == 1:
            return None
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                "num_processes": num_processes, "process_id": _int_env(env, "JAX_PROCESS_ID")}
    if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env and _int_env(env, "SLURM_NTASKS") > 1:
        return {"cluster_detection_method": "slurm"}
    if env.get("JAX_DISTRIBUTED_AUTO", "") == "1":
        return {}
    return None


def initialize() -> None:
    """Joins the process group described by the environment; no-op for a single process."""
    if jax.distributed.is_initialized():
        return
    kwargs = launcher_arguments()
    if kwargs is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
