"""Every client reaches the emulator named by STORAGE_EMULATOR_HOST: gcsfs (epath), tensorstore
(orbax's array store) and TFDS (tests/agfsync_jax/pairs/test_dataset.py), in a fresh process that
has only that variable set."""

from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.slow  # a subprocess importing JAX and orbax


def test_orbax_checkpoints_go_through_the_emulator(gcs_emulator, run_python):
    url = gcs_emulator.url("clients", "checkpoints")
    proc = run_python(textwrap.dedent(f"""
        import numpy as np
        import orbax.checkpoint as ocp
        from agfsync_jax import storage

        directory = storage.as_path({url!r})
        state = {{"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int32)}}
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        manager.save(1, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        restored = manager.restore(1, args=ocp.args.StandardRestore(state))
        manager.close()
        assert all(np.array_equal(restored[k], state[k]) for k in state)
        print("restored", sorted(restored))
    """), env={"STORAGE_EMULATOR_HOST": gcs_emulator.host, "EPATH_USE_TF": "", "TENSORSTORE_GCS_HTTP_URL": "",
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": ""})
    assert "restored ['b', 'w']" in proc.stdout
    names = gcs_emulator.object_names("clients/checkpoints/")
    # tensorstore's array data (OCDBT) and orbax's commit file, both in the bucket.
    assert "clients/checkpoints/1/commit_success.txt" in names
    assert any("/ocdbt.process_" in n or "/d/" in n for n in names), names
