"""Two local processes x 2 CPU devices under jax.distributed (gloo) train exactly like one process
with 4 devices fed the same global batches, and write one shared checkpoint that restores; for
full training and for LoRA adapters."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.training import train

pytestmark = pytest.mark.slow  # subprocesses and compilation: minutes on 2 CPU cores

STEPS = 3


VARIANTS = {"full": "", "lora": "config.train.lora.rank = 4\n"}


def _config_code(model_path: Path, variant: str = "full") -> str:
    return textwrap.dedent(f"""
        from configs import tiny
        config = tiny.get_config()
        config.model.tiny, config.model.path = "", {str(model_path)!r}
        config.train.batch_size, config.train.steps, config.train.log_every = 4, {STEPS}, 1
        config.train.checkpoint_every, config.train.text_encoding = {STEPS}, "cached"
        # Adam's early updates are lr * sign(g) wherever |g| >> eps; gradient entries at rounding
        # level would flip whole updates between two reduction orders. A larger eps keeps the
        # comparison about the processes, not about the sign of noise.
        config.train.adam_eps = 1e-3
        config.train.val_pairs, config.train.eval_every, config.train.val_prompts = 0, 0, ()  # eight pairs: no validation
    """) + VARIANTS[variant]


def _losses(workdir: Path) -> dict[int, float]:
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tf = tensorflow_cpu_only()
    out = {}
    for path in glob.glob(str(workdir / workdir_lib.TRAIN / train.TENSORBOARD / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "train/loss":
                    out[event.step] = float(tf.make_ndarray(value.tensor))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_processes_match_one_process_and_share_a_checkpoint(tmp_path, run_python, micro_sd1_path,
                                                                pair_writer, variant):
    pairs = pair_writer(tmp_path / "pairs", 8, shards=2)
    distributed, single = tmp_path / "distributed", tmp_path / "single"
    for wd in (distributed, single):
        os.makedirs(wd)
        os.symlink(pairs, wd / workdir_lib.PAIRS)

    # Two processes through the stage entry point, which joins the group from the environment.
    port = _free_port()
    code = _config_code(micro_sd1_path, variant) + textwrap.dedent(f"""
        import jax
        from agfsync_jax.training import stage
        stage.run(config, {str(distributed)!r})
        print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())
    """)
    repo = Path(__file__).resolve().parents[3]
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=repo, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert "process 0 of 2 devices 4" in outputs[0] and "process 1 of 2 devices 4" in outputs[1]

    # One process, 4 devices, fed the same global batches: both processes' slices, in order.
    reference = _config_code(micro_sd1_path, variant) + textwrap.dedent(f"""
        import jax, numpy as np
        from agfsync_jax import sharding
        from agfsync_jax.models.loading import load_stable_diffusion
        from agfsync_jax.pairs.dataset import PairDataset
        from agfsync_jax.training import checkpointing, train
        assert jax.process_count() == 1 and jax.device_count() == 4

        class BothSlices:
            def __init__(self, path):
                self.parts = [PairDataset(path, global_batch_size=4, seed=0, process_index=i, process_count=2)
                              for i in range(2)]
            def __next__(self):
                batches = [next(p) for p in self.parts]
                return {{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}}
            def state(self):
                return self.parts[0].state()
            def restore(self, state):
                for p in self.parts:
                    p.restore(state)

        train.open_pairs = lambda config, workdir, split=None: BothSlices({str(pairs)!r})
        train.train_and_evaluate(config, {str(single)!r})

        # The two processes' checkpoint restores onto this process's 4-device mesh.
        sd = load_stable_diffusion(config.model.path, components=("unet", "text_encoders"))
        setup = train.build_training(config, sd, sharding.make_mesh(config.mesh))
        states = {{}}
        for name in ("distributed", "single"):
            ckpt = checkpointing.Checkpointer(f"{str(tmp_path)}/{{name}}/train/checkpoints", save_every=1, keep=1)
            states[name], position = ckpt.restore({STEPS}, setup.abstract_state)
            ckpt.close()
        a, b = (jax.device_get(states[n].params) for n in ("distributed", "single"))
        leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
        diff = max(float(np.max(np.abs(x - y))) for x, y in leaves)
        print("restored distributed checkpoint: step", int(states["distributed"].step), "position", position,
              "max |params - single-process params|", diff)
        assert int(states["distributed"].step) == {STEPS} and diff < 1e-5, diff
    """)
    proc = run_python(reference, devices=4)
    print(proc.stdout[-2000:])

    ours, theirs = _losses(distributed), _losses(single)
    print("losses 2 processes", ours, "\n       1 process  ", theirs)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    # Not bitwise: gloo and the in-process all-reduce sum in different orders, and beta = 5000
    # amplifies float32 rounding (observed: ~6e-6 relative).
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], rtol=5e-5)
    assert len(set(np.round(list(ours.values()), 6))) == STEPS  # the runs did change the loss
    done = json.loads((distributed / workdir_lib.TRAIN / workdir_lib.DONE_MARKER).read_text())
    assert done["step"] == STEPS
    # One checkpoint for both processes: a single step directory holding both processes' shards.
    ckpt = distributed / workdir_lib.TRAIN / train.CHECKPOINTS
    assert sorted(os.listdir(ckpt)) == [str(STEPS)]
    assert {Path(p).name for p in glob.glob(str(ckpt / str(STEPS) / "state" / "ocdbt.process_*"))} == {
        "ocdbt.process_0", "ocdbt.process_1"}
