"""What the plan tells a user to change follows from where the memory goes."""

from __future__ import annotations

from agfsync_jax.plan.advice import what_to_change
from agfsync_jax.plan.compile_plan import SAMPLE, TRAIN, ProgramPlan
from configs import sd15

GIB = 2**30


def _plan(program: str, argument_gib: float | None, fsdp: int = 1) -> ProgramPlan:
    memory = None if argument_gib is None else {
        "argument": int(argument_gib * GIB), "output": 0, "alias": 0, "temp": 20 * GIB, "generated_code": 0,
        "peak": int((argument_gib + 20) * GIB)}
    return ProgramPlan(program=program, num_devices=8, mesh={"data": 8 // fsdp, "fsdp": fsdp}, items_per_call=128,
                       item="pair", per_device="", hbm_bytes=16 * GIB, memory=memory, flops_per_call=1.0,
                       flop_breakdown={}, compiler_flops_per_device=None, compile_seconds=0.0,
                       error=None if memory else "RESOURCE_EXHAUSTED: Ran out of memory")


def _config():
    config = sd15.get_config()
    config.train.grad_accum_steps = 1  # 128 pairs on 8 devices: 16 per device at once
    config.mesh.fsdp = 1
    return config


def test_activations_first_when_the_state_fits():
    config = _config()
    advice = what_to_change(config, _plan(TRAIN, argument_gib=2.0))
    assert advice[0].startswith("--config.train.grad_accum_steps=2 ")
    assert any("--config.train.attention=flash" in a for a in advice)
    assert any("--config.mesh.fsdp=8" in a for a in advice)


def test_only_sharding_helps_when_the_state_alone_is_too_big():
    config = _config()
    advice = what_to_change(config, _plan(TRAIN, argument_gib=30.0))
    assert advice[0].startswith("--config.mesh.fsdp=8")
    assert not any("grad_accum" in a or "remat" in a for a in advice)
    sharded = what_to_change(config, _plan(TRAIN, argument_gib=30.0, fsdp=8))
    assert not any("mesh.fsdp" in a for a in sharded) and any("larger slice" in a for a in sharded)


def test_a_refused_program_gets_every_applicable_fix():
    config = _config()
    config.sampling.microbatch = 4
    advice = what_to_change(config, _plan(SAMPLE, argument_gib=None))
    assert advice[0] == "--config.sampling.microbatch=2 (fewer images per UNet call)"
    assert any("sampling.shard_params=fsdp" in a for a in advice)
