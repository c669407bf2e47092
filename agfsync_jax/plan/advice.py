"""What to change when a planned program does not fit: config overrides, most effective first.

The advice follows from where the memory goes. When the arguments alone (parameters, optimizer
state, frozen trees, the batch) exceed a device's HBM, only spreading them over more devices
helps (FSDP, a larger slice, no text encoders in the step); when the temporaries (activations
kept for the backward pass, attention scores) dominate, recomputing or shrinking them helps
(remat, smaller per-device microbatches, bfloat16, a fused attention kernel).
"""

from __future__ import annotations

from typing import Any

from agfsync_jax.plan.compile_plan import SAMPLE, TRAIN, ProgramPlan


def _train_advice(config: Any, plan: ProgramPlan, arguments_too_big: bool | None) -> list[str]:
    t, n = config.train, plan.num_devices
    accum = int(t.grad_accum_steps)
    micro = int(t.batch_size) // n // accum
    state = []
    if plan.mesh.get("fsdp", 1) < n or config.mesh.shard_params != "fsdp":
        state.append(f"--config.mesh.fsdp={n} --config.mesh.shard_params=fsdp (shard parameters and "
                     "optimizer state over all devices)")
    if t.text_encoding == "in_step":
        state.append("--config.train.text_encoding=cached (no text encoders in the step)")
    state.append("a larger slice (more chips share the state and the batch)")
    activations = []
    if micro > 1:
        activations.append(f"--config.train.grad_accum_steps={2 * accum} (halves the per-device microbatch, "
                           f"{micro} -> {micro // 2} pairs; same optimizer step)")
    if not t.remat:
        activations.append("--config.train.remat=True (recompute activations in the backward pass)")
    elif t.remat_policy != "nothing_saveable":
        activations.append("--config.train.remat_policy=nothing_saveable (save only each layer's inputs)")
    if config.model.compute_dtype == "float32":
        activations.append("--config.model.compute_dtype=bfloat16 (half-size activations; master weights "
                           "stay float32)")
    if t.attention != "flash":
        activations.append("--config.train.attention=flash (the fused kernel: no N x N scores kept)")
    return state if arguments_too_big else activations + state


def _sample_advice(config: Any, plan: ProgramPlan) -> list[str]:
    s, n = config.sampling, plan.num_devices
    out = []
    if int(s.microbatch) > 1:
        out.append(f"--config.sampling.microbatch={int(s.microbatch) // 2} (fewer images per UNet call)")
    if s.shard_params != "fsdp" or plan.mesh.get("fsdp", 1) < n:
        out.append(f"--config.sampling.shard_params=fsdp --config.mesh.fsdp={n} (shard the models over devices)")
    if config.model.compute_dtype == "float32":
        out.append("--config.model.compute_dtype=bfloat16")
    if s.attention != "flash":
        out.append("--config.sampling.attention=flash")
    return out


def what_to_change(config: Any, plan: ProgramPlan) -> list[str]:
    """Overrides that reduce `plan`'s per-device memory, most effective first."""
    arguments_too_big = None if plan.memory is None else plan.memory["argument"] > plan.hbm_bytes
    if plan.program == TRAIN:
        return _train_advice(config, plan, arguments_too_big)
    if plan.program == SAMPLE:
        return _sample_advice(config, plan)
    raise ValueError(f"unknown program {plan.program!r}")
