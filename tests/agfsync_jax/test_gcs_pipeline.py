"""The tiny pipeline with `--workdir=gs://...`, against a GCS emulator started by the test.

Every stage runs as a user runs it (the console entry point, `launch/local.py` for two
processes) with only STORAGE_EMULATOR_HOST pointing the clients at the emulator, the base model
given as a gs:// folder, and the current directory an empty one: sample with 2 processes, score,
train with 2 processes (killed with SIGKILL after its first checkpoint, then resumed, and
compared with an uninterrupted run), export, eval. Nothing may appear on local disk but the
caches outside the working directory; the report and the exported model must be in the bucket,
listed through the emulator's own API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # ten processes, three of them training: minutes on 2 CPU cores

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.py")
RUN, STRAIGHT, MODEL = "run", "straight", "models/micro-sd1"
STATE_FIELDS = ("params", "opt_state", "rng", "step", "nonfinite_steps")
TOTAL_STEPS, KILL_AT = 4, 3  # the kill comes after the step-2 checkpoint


def _overrides(model_url: str) -> dict[str, object]:
    return {
        "model.tiny": "", "model.path": model_url,
        "prompts.per_category": 1,  # 12 prompts
        "sampling.num_candidates": 2, "sampling.steps": 2, "sampling.batch_size": 4,
        "train.batch_size": 2, "train.steps": TOTAL_STEPS, "train.checkpoint_every": 2,
        "train.keep_checkpoints": 2, "train.log_every": 1,
        # Validation over gs:// in both processes, across the kill: 2 of the 12 pairs held out.
        "train.val_pairs": 2, "train.eval_every": 2, "train.val_sample_steps": 2,
        "eval.num_prompts": 4, "eval.grid_prompts": 2, "eval.extra_scorers": "",
    }


def _flags(overrides: dict[str, object]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def _micro_sd1(out: Path) -> Path:
    """The tiny SD1.x pipeline with a UNet of one down and one up block (as
    tests/agfsync_jax/training/conftest.py: micro_sd1_path): the same classes and loading path,
    about half the tiny UNet's compile time."""
    import torch
    from diffusers import UNet2DConditionModel

    from agfsync_jax.tiny import pipeline as tiny

    pipe = tiny.build_tiny_pipeline("sd1", seed=0)
    torch.manual_seed(1)
    pipe.register_modules(unet=UNet2DConditionModel(
        sample_size=tiny.TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


class _Runner:
    """Runs commands from an empty directory with the emulator's and the caches' environment."""

    def __init__(self, cwd: Path, env: dict[str, str], compile_cache: dict[str, str], logs: Path):
        self.cwd, self.env, self.compile_cache, self.log, self.logs = cwd, env, compile_cache, [], logs
        logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, *command: str, check: bool = True, processes: int = 1) -> subprocess.CompletedProcess:
        # JAX's persistent compilation cache lets single-process stages share compiled programs;
        # training with 2 processes and the cache on lost the coordination service's heartbeats
        # (both processes aborted) on the 2-core machine, so multi-process runs go without it.
        env = {**self.env, **(self.compile_cache if processes == 1 else {})}
        start = time.time()
        proc = subprocess.run(list(command), cwd=self.cwd, env=env, capture_output=True, text=True, timeout=900)
        self.log.append((" ".join(command[2:5]), round(time.time() - start)))
        print(f"gcs pipeline: {self.log[-1][0]}: {self.log[-1][1]} s", flush=True)
        # The whole output stays on disk: a crash's cause is often far above its last lines.
        log = self.logs / f"{len(self.log):02d}.log"
        log.write_text(f"{' '.join(command)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        if check and proc.returncode != 0:
            noise = ("deprecated", "Extension modules:", "oneDNN custom operations")
            stderr = "\n".join(line for line in proc.stderr.splitlines() if not any(n in line for n in noise))
            pytest.fail(f"{' '.join(command[:6])} ... failed ({proc.returncode}); full output in {log}:\n"
                        f"{proc.stdout[-3000:]}\n{stderr[-6000:]}")
        return proc

    def stage(self, stage: str, workdir: str, flags: list[str], processes: int = 1, check: bool = True):
        command = [sys.executable, "-m", "agfsync_jax.main", stage, f"--config={CONFIG}", f"--workdir={workdir}",
                   *flags]
        if processes > 1:
            command = [sys.executable, str(REPO / "launch" / "local.py"), f"--num_processes={processes}",
                       "--devices_per_process=1", "--", *command]
        return self(*command, check=check, processes=processes)


@pytest.fixture(scope="module")
def gs_run(gcs_emulator, tmp_path_factory):
    from agfsync_jax import storage

    root = tmp_path_factory.mktemp("gcs_pipeline")
    cwd = root / "cwd"
    cwd.mkdir()
    model_url = gcs_emulator.url(MODEL)
    storage.copy_tree(_micro_sd1(root / "micro-sd1"), model_url)
    overrides = _overrides(model_url)
    flags = _flags(overrides)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.host, "PYTHONPATH": str(REPO),
           "AGFSYNC_JAX_CACHE": str(root / "cache"), "JAX_PLATFORMS": "cpu"}
    compile_cache = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for name in ("EPATH_USE_TF", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        env.pop(name, None)  # the children configure their clients from STORAGE_EMULATOR_HOST alone
    run = _Runner(cwd, env, compile_cache, root / "logs")
    wd, straight = gcs_emulator.url(RUN), gcs_emulator.url(STRAIGHT)

    run.stage("prompts", wd, flags)
    sample = run.stage("sample", wd, flags, processes=2)
    run.stage("score", wd, flags)
    # In one launch of 2 processes (one compilation): the uninterrupted reference on a copy of
    # the pairs, then the same run killed (every process) after its step-2 checkpoint is committed.
    storage.copy_tree(storage.as_path(wd) / "pairs", storage.as_path(straight) / "pairs")
    worker = root / "train_twice.py"
    worker.write_text(textwrap.dedent(f"""
        import os, signal
        from configs import tiny
        from agfsync_jax import distributed
        from agfsync_jax.training import checkpointing, train

        config = tiny.get_config()
        for key, value in {overrides!r}.items():
            section, field = key.split(".")
            setattr(config[section], field, value)
        distributed.initialize()
        train.train_and_evaluate(config, {straight!r})
        print("straight run done", flush=True)
        should_save = checkpointing.Checkpointer.should_save
        def kill(self, step):
            if step == {KILL_AT}:
                self.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            return should_save(self, step)
        checkpointing.Checkpointer.should_save = kill
        train.train_and_evaluate(config, {wd!r})
    """))
    killed = run(sys.executable, str(REPO / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=1",
                 "--", sys.executable, str(worker), check=False, processes=2)
    checkpoints_after_kill = sorted({n.split("/")[3] for n in gcs_emulator.object_names(f"{RUN}/train/checkpoints/")
                                     if n.endswith("commit_success.txt")})
    resumed = run.stage("train", wd, flags, processes=2)
    run.stage("export", wd, flags)
    evaluation = run.stage("eval", wd, flags)
    return {"root": root, "cwd": cwd, "wd": wd, "straight": straight, "sample": sample, "killed": killed,
            "checkpoints_after_kill": checkpoints_after_kill, "resumed": resumed, "eval": evaluation,
            "emulator": gcs_emulator}


def test_nothing_is_written_to_local_disk(gs_run):
    assert sorted(os.listdir(gs_run["cwd"])) == []
    collapsed = [str(p) for base in (gs_run["root"], REPO) for p in base.rglob("gs:*")]
    assert not collapsed, f"pathlib-collapsed URLs became local folders: {collapsed}"


def test_sampling_ran_in_two_processes_into_the_bucket(gs_run):
    out = gs_run["sample"].stdout
    assert "[p0]" in out and "[p1]" in out
    names = gs_run["emulator"].object_names(f"{RUN}/candidates/")
    assert f"{RUN}/candidates/_DONE.json" in names
    assert sum(n.endswith(".png") for n in names) == sum(n.endswith(".npy") for n in names) == 24
    # One manifest per process, each a log of part objects (storage.jsonl) compacted at close.
    manifests = {n.split("/")[2]: n.split("/")[3] for n in names if n.split("/")[2].startswith("manifest-")}
    assert len(manifests) == 2 and all(part.endswith("-00000000.jsonl") for part in manifests.values()), manifests


def test_resumed_training_equals_the_uninterrupted_run(gs_run):
    import jax

    from agfsync_jax import storage
    from agfsync_jax.training import checkpointing, train

    killed = gs_run["killed"]
    assert killed.returncode != 0 and "[p0] straight run done" in killed.stdout, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "[p1] straight run done" in killed.stdout and gs_run["checkpoints_after_kill"] == ["2"]
    assert "[p0]" in gs_run["resumed"].stdout and "[p1]" in gs_run["resumed"].stdout
    train_dir = storage.as_path(gs_run["wd"]) / "train"
    assert storage.read_json(train_dir / train.CONFIG_JSON)["_resolved"]["started_at_step"] == 2
    assert storage.read_json(train_dir / "_DONE.json")["step"] == TOTAL_STEPS
    runs = [checkpointing.read_checkpoint(checkpointing.checkpoint_dir(w), None, STATE_FIELDS)
            for w in (gs_run["straight"], gs_run["wd"])]
    (step_a, a), (step_b, b) = runs
    assert step_a == step_b == TOTAL_STEPS
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 100
    unequal = [i for i, (x, y) in enumerate(zip(leaves_a, leaves_b)) if not np.array_equal(x, y)]
    assert not unequal, f"{len(unequal)} of {len(leaves_a)} leaves differ"
    events = gs_run["emulator"].object_names(f"{RUN}/train/tensorboard/")
    assert len(events) == 2 and all("events.out.tfevents." in n for n in events)  # one per process-0 start
    # Validation wrote its split and its grids (step 2 before the kill, step 4 after) to the bucket.
    assert len(storage.read_json(train_dir / "val_split.json")["held_out"]) == 2
    grids = gs_run["emulator"].object_names(f"{RUN}/train/{train.VAL_SAMPLES}/")
    assert sorted(n.rsplit("/", 1)[1] for n in grids) == ["step-0000002.png", "step-0000004.png"], grids


def test_report_and_exported_model_are_in_the_bucket(gs_run):
    names = gs_run["emulator"].object_names(f"{RUN}/")
    for required in ("export/_DONE.json", "export/pipeline/model_index.json",
                     "export/pipeline/unet/diffusion_pytorch_model.safetensors", "export/pipeline/vae/config.json"):
        assert f"{RUN}/{required}" in names, required
    reports = [n for n in names if n.startswith(f"{RUN}/eval/") and n.endswith("/report.md")]
    assert len(reports) == 1, reports
    set_dir = reports[0].rsplit("/", 1)[0]
    assert {f"{set_dir}/metrics.json", f"{set_dir}/win_rates.png", f"{set_dir}/_DONE.json"} <= set(names)
    assert f"report gs://{gs_run['emulator'].bucket}/{reports[0]}" in gs_run["eval"].stdout
    from agfsync_jax import storage

    report = storage.read_text(f"gs://{gs_run['emulator'].bucket}/{reports[0]}")
    assert "## Win rates of finetuned over base" in report


def test_a_gs_model_folder_is_loaded_from_its_local_copy(gs_run):
    """Every stage loaded model.path=gs://... through one cached local copy of it."""
    copies = list((gs_run["root"] / "cache" / "folders").iterdir())
    names = sorted(p.name.split("-", 1)[1] for p in copies)
    # One copy each of the base model, the exported pipeline (eval's finetuned model) and the
    # tiny scorers built under WORKDIR/scores/tiny_models.
    assert len(names) == len(set(names)) and {"micro-sd1", "pipeline", "clip", "blip2_t5"} <= set(names), names
    base = next(p for p in copies if p.name.endswith("micro-sd1"))
    assert (base / "unet" / "config.json").is_file() and (base / "model_index.json").is_file()
