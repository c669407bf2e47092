"""Exact resume of a LoRA run through the real loop, with the optimizer options that carry state
(bf16 Adam moments, cosine schedule with warmup, EMA): 6 steps straight == 3 steps, SIGKILL,
resume to 6, bitwise, for adapters, optimizer state and EMA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from agfsync_jax import lora, workdir as workdir_lib
from agfsync_jax.training import checkpointing, train

pytestmark = pytest.mark.slow  # subprocesses and compilation: minutes on 2 CPU cores

STATE_FIELDS = ("params", "opt_state", "rng", "step", "nonfinite_steps", "ema_params")


def _config_code(model_path: Path) -> str:
    return textwrap.dedent(f"""
        from configs import tiny
        config = tiny.get_config()
        config.model.tiny, config.model.path = "", {str(model_path)!r}
        config.train.batch_size, config.train.steps = 2, 6
        config.train.checkpoint_every, config.train.keep_checkpoints, config.train.log_every = 3, 2, 1
        config.train.text_encoding = "cached"
        config.train.val_pairs, config.train.eval_every, config.train.val_prompts = 0, 0, ()  # six pairs: no validation
        config.train.lora.rank, config.train.lora.targets = 4, "attention,resnet_convs"
        config.train.adam_moments_dtype, config.train.ema_decay = "bfloat16", 0.9
        config.train.lr_schedule, config.train.warmup_steps = "cosine", 2
    """)


def test_resumed_lora_run_is_bitwise_equal_to_straight_run(tmp_path, run_python, micro_sd1_path, pair_writer):
    pairs = pair_writer(tmp_path / "pairs", 6, shards=2)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for wd in (straight, interrupted):
        shutil.copytree(pairs, wd / workdir_lib.PAIRS)
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = run_python(_config_code(micro_sd1_path) + textwrap.dedent(f"""
        import os, signal
        from agfsync_jax.training import checkpointing, train
        train.train_and_evaluate(config, {str(straight)!r})
        print("straight run done", flush=True)
        should_save = checkpointing.Checkpointer.should_save
        def kill_at_step_5(self, step):
            if step == 5:
                self.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            return should_save(self, step)
        checkpointing.Checkpointer.should_save = kill_at_step_5
        train.train_and_evaluate(config, {str(interrupted)!r})
    """), env=env, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(interrupted / workdir_lib.TRAIN / train.CHECKPOINTS)) == ["3"]
    run_python(_config_code(micro_sd1_path) + textwrap.dedent(f"""
        from agfsync_jax.training import train
        train.train_and_evaluate(config, {str(interrupted)!r})
    """), env=env)

    resolved = json.loads((interrupted / workdir_lib.TRAIN / train.CONFIG_JSON).read_text())
    assert resolved["_resolved"]["started_at_step"] == 3
    dirs = [wd / workdir_lib.TRAIN / train.CHECKPOINTS for wd in (straight, interrupted)]
    (_, a), (_, b) = (checkpointing.read_checkpoint(d, None, STATE_FIELDS) for d in dirs)
    assert lora.is_adapter_tree(a["params"]) and lora.is_adapter_tree(a["ema_params"])
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 100
    unequal = [i for i, (x, y) in enumerate(zip(leaves_a, leaves_b)) if not np.array_equal(x, y)]
    assert not unequal, f"{len(unequal)} of {len(leaves_a)} leaves differ"
    _, at3 = checkpointing.read_checkpoint(dirs[0], 3, ("params", "ema_params"))
    for field in ("params", "ema_params"):  # steps 4-6 trained the adapters and moved their average
        assert not all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(at3[field]),
                                                            jax.tree_util.tree_leaves(a[field])))
