"""Exact resume through the real loop (SD1.x, text encoded in the step, prompt dropout on,
validation on): 6 steps straight == 3 steps, SIGKILL, resume to 6, bitwise; validation changes
nothing in training (== the same run with validation off) and writes its curve and samples; and a
corrupted latest checkpoint stops the run with the reason instead of starting over."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from agfsync_jax import workdir as workdir_lib
from agfsync_jax.training import checkpointing, train

pytestmark = pytest.mark.slow  # subprocesses and compilation: minutes on 2 CPU cores

STATE_FIELDS = ("params", "opt_state", "rng", "step", "nonfinite_steps")


def _config_code(model_path: Path) -> str:
    return textwrap.dedent(f"""
        from configs import tiny
        config = tiny.get_config()
        config.model.tiny, config.model.path = "", {str(model_path)!r}
        config.train.batch_size, config.train.steps = 2, 6
        config.train.checkpoint_every, config.train.keep_checkpoints, config.train.log_every = 3, 2, 1
        config.train.text_encoding, config.train.prompt_dropout = "in_step", 0.25
        # Validation: 2 of the 8 pairs held out, scored every 2 steps, and a 1 x 2 sample grid.
        config.train.val_pairs, config.train.eval_every, config.train.val_batch_size = 2, 2, 2
        config.train.val_prompts, config.train.val_images_per_prompt = ("a red cat",), 2
        config.train.val_sample_steps = 2
    """)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_python, micro_sd1_path, pair_writer):
    root = tmp_path_factory.mktemp("resume")
    # 8 pairs, 2 held out, batch 2: an epoch is 3 steps, so the resumed run also crosses an epoch
    # boundary.
    pairs = pair_writer(root / "pairs", 8, shards=2)
    straight, interrupted, no_eval = root / "straight", root / "interrupted", root / "no_eval"
    for wd in (straight, interrupted, no_eval):
        shutil.copytree(pairs, wd / workdir_lib.PAIRS)
    # One compilation serves both processes.
    env = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    first = _config_code(micro_sd1_path) + textwrap.dedent(f"""
        import os, signal
        from agfsync_jax.training import checkpointing, train
        train.train_and_evaluate(config, {str(straight)!r})
        print("straight run done", flush=True)
        eval_every, val_prompts = config.train.eval_every, config.train.val_prompts
        config.train.eval_every, config.train.val_prompts = 0, ()  # the same split, no validation
        train.train_and_evaluate(config, {str(no_eval)!r})
        config.train.eval_every, config.train.val_prompts = eval_every, val_prompts

        should_save = checkpointing.Checkpointer.should_save
        def kill_at_step_5(self, step):
            if step == 5:  # steps 4 and 5 ran; only the step-3 checkpoint exists
                self.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            return should_save(self, step)
        checkpointing.Checkpointer.should_save = kill_at_step_5
        train.train_and_evaluate(config, {str(interrupted)!r})
    """)
    proc = run_python(first, env=env, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "straight run done" in proc.stdout
    assert sorted(os.listdir(interrupted / workdir_lib.TRAIN / train.CHECKPOINTS)) == ["3"]
    run_python(_config_code(micro_sd1_path) + textwrap.dedent(f"""
        from agfsync_jax.training import train
        train.train_and_evaluate(config, {str(interrupted)!r})
    """), env=env)
    return straight, interrupted, no_eval


def _final_state(train_dir: Path) -> tuple[int, dict]:
    return checkpointing.read_checkpoint(train_dir / train.CHECKPOINTS, None, STATE_FIELDS)


def _events(train_dir: Path, prefix: str) -> dict[str, dict[int, object]]:
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tf = tensorflow_cpu_only()
    out: dict[str, dict[int, object]] = {}
    for path in sorted(glob.glob(str(train_dir / train.TENSORBOARD / "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith(prefix):
                    out.setdefault(value.tag, {})[event.step] = value
    return out


def test_resumed_run_is_bitwise_equal_to_straight_run(runs):
    straight, interrupted = (wd / workdir_lib.TRAIN for wd in runs[:2])
    resolved = json.loads((interrupted / train.CONFIG_JSON).read_text())
    assert resolved["_resolved"]["started_at_step"] == 3  # it did resume, from step 3
    # The loop writes no done marker: the `train` stage does, with the run's settings.
    assert not any((wd / workdir_lib.DONE_MARKER).exists() for wd in (straight, interrupted))
    step_a, a = _final_state(straight)
    step_b, b = _final_state(interrupted)
    assert step_a == step_b == 6 and int(a["step"]) == 6
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 400  # params + Adam mu and nu, not an empty tree
    unequal = [i for i, (x, y) in enumerate(zip(leaves_a, leaves_b)) if not np.array_equal(x, y)]
    assert not unequal, f"{len(unequal)} of {len(leaves_a)} leaves differ"
    _, base = checkpointing.read_checkpoint(straight / train.CHECKPOINTS, 3, ("params",))
    leaves = zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(a["params"]))
    assert not all(np.array_equal(x, y) for x, y in leaves)  # steps 4-6 did train


def test_validation_changes_nothing_in_training(runs):
    """Validation reads its own data and keys: with it on, training is bitwise what it is without."""
    straight, _, no_eval = (wd / workdir_lib.TRAIN for wd in runs)
    (_, a), (_, b) = _final_state(straight), _final_state(no_eval)
    unequal = [i for i, (x, y) in enumerate(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
               if not np.array_equal(x, y)]
    assert not unequal, f"{len(unequal)} leaves differ"
    assert not _events(no_eval, "val/") and not (no_eval / train.VAL_SAMPLES).exists()
    assert json.loads((no_eval / "val_split.json").read_text()) == json.loads((straight / "val_split.json").read_text())


def test_validation_curve_and_samples_in_tensorboard(runs):
    from PIL import Image

    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tf = tensorflow_cpu_only()
    straight, interrupted = (wd / workdir_lib.TRAIN for wd in runs[:2])
    events = _events(straight, "val/")
    for tag in ("val/loss", "val/implicit_acc", "val/reward_margin", "val/samples"):
        assert sorted(events[tag]) == [2, 4, 6], tag
    loss = {s: float(tf.make_ndarray(v.tensor)) for s, v in events["val/loss"].items()}
    assert all(np.isfinite(list(loss.values()))) and len(set(loss.values())) == 3
    width, height, png = events["val/samples"][6].tensor.string_val
    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert grid.shape == (int(height), int(width), 3) == (32, 66, 3)
    assert grid[:, :32].std() > 0 and not np.array_equal(grid[:, :32], grid[:, 34:])  # two seeds, two images
    # The resumed run validates the same parameters with the same pairs and keys: the same numbers.
    resumed = _events(interrupted, "val/")
    assert float(tf.make_ndarray(resumed["val/loss"][6].tensor)) == loss[6]
    assert resumed["val/samples"][6].tensor.string_val[2] == png


def test_tensorboard_has_one_loss_per_step(runs):
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tf = tensorflow_cpu_only()
    events = glob.glob(str(runs[0] / workdir_lib.TRAIN / train.TENSORBOARD / "events.out.tfevents.*"))
    steps = {}
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "train/loss":
                    steps[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(steps) == list(range(1, 7)) and all(np.isfinite(list(steps.values())))


def test_corrupted_latest_checkpoint_stops_with_the_reason(runs, tmp_path, micro_sd1_path):
    from configs import tiny

    workdir = tmp_path / "wd"
    shutil.copytree(runs[1], workdir)
    data = max(glob.glob(str(workdir / workdir_lib.TRAIN / train.CHECKPOINTS / "6" / "state" / "**" / "d" / "*"),
                       recursive=True), key=os.path.getsize)
    blob = bytearray(Path(data).read_bytes())
    # Bit rot all over the array data (where orbax lays out each array varies from save to save):
    # decoding then fails, or yields other numbers without complaint, which only the fingerprint
    # saved with the checkpoint catches. Either must stop the run.
    for i in range(0, len(blob), 997):
        blob[i] ^= 0x5A
    Path(data).write_bytes(bytes(blob))

    config = tiny.get_config()
    config.model.tiny, config.model.path = "", str(micro_sd1_path)
    config.train.batch_size, config.train.steps, config.train.text_encoding = 2, 8, "in_step"
    config.train.val_pairs, config.train.val_batch_size = 2, 2  # as the run recorded them
    before = sorted(os.listdir(workdir / workdir_lib.TRAIN / train.CHECKPOINTS))
    with pytest.raises(checkpointing.CheckpointRestoreError,
                       match=r"checkpoint step 6 .*(cannot be restored|corrupted)") as e:
        train.train_and_evaluate(config, workdir)
    print(e.value)
    assert "base weights" in str(e.value)  # says it will not fall back to them
    assert sorted(os.listdir(workdir / workdir_lib.TRAIN / train.CHECKPOINTS)) == before
    # The host-side reader (export) refuses it too when it reads every field: the loop's restore
    # read the same arrays and found the damage, wherever it sits.
    with pytest.raises(checkpointing.CheckpointRestoreError, match="step 6"):
        checkpointing.read_checkpoint(workdir / workdir_lib.TRAIN / train.CHECKPOINTS, None, STATE_FIELDS)
