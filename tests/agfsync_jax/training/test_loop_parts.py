"""Small parts of the loop that need no model: launcher environment, config checks, pair kinds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agfsync_jax import sharding
from agfsync_jax import distributed
from agfsync_jax.training import losses, train


def test_launcher_arguments_from_the_environment():
    assert distributed.launcher_arguments({}) is None
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.launcher_arguments(explicit) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed.launcher_arguments(dict(explicit, JAX_NUM_PROCESSES="1")) is None
    with pytest.raises(ValueError, match="together"):
        distributed.launcher_arguments({"JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        distributed.launcher_arguments(dict(explicit, JAX_PROCESS_ID="x"))
    assert distributed.launcher_arguments({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == {
        "cluster_detection_method": "slurm"}
    assert distributed.launcher_arguments({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.launcher_arguments({"JAX_DISTRIBUTED_AUTO": "1"}) == {}
    distributed.initialize()  # single process: a no-op
    assert jax.process_count() == 1


def _config(**train_overrides):
    from configs import tiny

    config = tiny.get_config()
    config.train.val_pairs, config.train.eval_every, config.train.val_prompts = 0, 0, ()
    for k, v in train_overrides.items():
        setattr(config.train, k, v)
    return config


def test_config_errors_name_the_field():
    mesh = sharding.make_mesh(_config().mesh)
    train.validate_config(_config(), mesh)
    for overrides, field in [({"nonfinite": "ignore"}, "train.nonfinite"),
                             ({"text_encoding": "lazy"}, "train.text_encoding"),
                             ({"prompt_dropout": 1.0}, "train.prompt_dropout"),
                             ({"batch_size": 3, "grad_accum_steps": 2}, "train.batch_size")]:
        with pytest.raises(ValueError, match=field):
            train.validate_config(_config(**overrides), mesh)


def test_lora_and_optimizer_config_errors_name_the_field():
    mesh = sharding.make_mesh(_config().mesh)
    for overrides, field in [({"optimizer": "sgd"}, "train.optimizer"),
                             ({"lr_schedule": "linear"}, "train.lr_schedule"),
                             ({"ema_decay": 1.0}, "train.ema_decay")]:
        with pytest.raises(ValueError, match=field):
            train.validate_config(_config(**overrides), mesh)
    config = _config()
    config.train.lora.rank, config.train.lora.targets = 4, "attention,mlp"
    with pytest.raises(ValueError, match="train.lora.targets"):
        train.validate_config(config, mesh)
    config.train.lora.rank = -1
    with pytest.raises(ValueError, match="train.lora.rank"):
        train.validate_config(config, mesh)


def test_sdxl_lora_config_validates():
    from configs import sdxl_lora

    config = sdxl_lora.get_config()
    assert config.train.lora.rank == 8 and config.model.param_dtype == "bfloat16"
    train.validate_config(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    assert train.lora_scale(config.train) == 1.0


def test_nonfinite_stop_mode_raises_and_skip_mode_does_not():
    class NoCheckpoints:
        def latest_step(self):
            return None

    bad = {"nonfinite": jnp.int32(1)}
    train.check_finite(bad, 7, "skip", NoCheckpoints())
    train.check_finite({"nonfinite": jnp.int32(0)}, 7, "stop", NoCheckpoints())
    with pytest.raises(train.NonFiniteError, match="step 7"):
        train.check_finite(bad, 7, "stop", NoCheckpoints())


def test_cross_loss_refuses_pairs_without_a_second_instruction():
    raw = {"is_cross": np.array([True, False]), "prompt_id": np.array(["a", "b"], object)}
    with pytest.raises(ValueError, match="cross pairs.*'b'"):
        train.step_inputs(raw, spec=losses.get_loss("cross_dpo"), sd=None, text_mode="cached",
                          prompt_encoder=None, resolution=32)
