"""Checkpointer round trips and its refusal of checkpoints that do not verify (small states)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agfsync_jax.training import checkpointing
from agfsync_jax.training.train_state import TrainState


def _state(step: int, scale: float) -> TrainState:
    params = {"conv": {"kernel": scale * jnp.arange(24.0).reshape(2, 3, 4)}, "bias": jnp.ones(3)}
    return TrainState(step=jnp.int32(step), params=params,
                      opt_state=({"mu": jax.tree_util.tree_map(jnp.zeros_like, params)},),
                      rng=jax.random.PRNGKey(step), nonfinite_steps=jnp.int32(1))


def _abstract(state: TrainState) -> TrainState:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def saved(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", save_every=2, keep=2)
    for step in (2, 4, 6):
        assert ckpt.should_save(step) and not ckpt.should_save(step + 1)
        ckpt.save(step, _state(step, float(step)), {"epoch": 0, "batch": step})
    ckpt.wait_until_finished()
    ckpt.close()
    return tmp_path / "ckpt"


def test_round_trip_keeps_the_last_n_and_the_data_position(saved):
    ckpt = checkpointing.Checkpointer(saved, save_every=2, keep=2)
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    state, position = ckpt.restore(6, _abstract(_state(0, 0.0)))
    ckpt.close()
    assert position == {"epoch": 0, "batch": 6} and int(state.step) == 6
    np.testing.assert_array_equal(state.params["conv"]["kernel"], _state(6, 6.0).params["conv"]["kernel"])
    np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(6))
    step, params = checkpointing.load_params(saved)
    assert step == 6 and isinstance(params["bias"], np.ndarray)
    np.testing.assert_array_equal(params["conv"]["kernel"], 6.0 * np.arange(24.0).reshape(2, 3, 4))
    assert checkpointing.load_params(saved, 4)[0] == 4
    with pytest.raises(checkpointing.CheckpointRestoreError, match="no checkpoint of step 2"):
        checkpointing.load_params(saved, 2)


def test_values_that_do_not_match_their_fingerprint_are_refused(saved):
    # What silently mis-decoded array data looks like to the reader: values that differ from
    # what was saved. Here the saved fingerprint is changed instead, to the same effect.
    meta_file = saved / "6" / checkpointing.META / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["fingerprint"]["params"][1] += 1.0
    meta_file.write_text(json.dumps(meta))
    ckpt = checkpointing.Checkpointer(saved, save_every=2, keep=2)
    with pytest.raises(checkpointing.CheckpointRestoreError, match="step 6.*restored params do not match"):
        ckpt.restore(6, _abstract(_state(0, 0.0)))
    ckpt.close()
    with pytest.raises(checkpointing.CheckpointRestoreError, match="params do not match"):
        checkpointing.load_params(saved)
    # The earlier checkpoint is intact and still restores.
    assert checkpointing.load_params(saved, 4)[0] == 4


def test_empty_directory_has_nothing_to_load(tmp_path):
    assert checkpointing.Checkpointer(tmp_path / "none", save_every=1, keep=1).latest_step() is None
    with pytest.raises(checkpointing.CheckpointRestoreError, match="no checkpoint to load"):
        checkpointing.load_params(tmp_path / "none")
