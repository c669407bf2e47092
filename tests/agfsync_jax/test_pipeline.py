"""The whole pipeline on the embedded tiny default, through the console entry point.

This is `make demo` in a test: prompts -> candidates -> scores/pairs -> train -> export -> eval
on the tiny SD1.x model (UNet pretrained on synthetic latents, the rest random) with tiny random
scorers. It checks the report a user reads, the
closed loop (the finetuned model beats the base on the training reward), that a re-run skips
every stage quickly, and that the local multi-process launcher trains with 2 processes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agfsync_jax import stages

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.py")

# The closed-loop bar: finetuned beats base on more prompts than a coin flip would, by a one-sided
# sign test at the 5% level (for the demo's 96 untied prompts: 57 wins, P(X >= 57 | p = 0.5) = 0.041).
# The measured counts are in docs/tiny_closed_loop.md.
ALPHA = 0.05


def _cli(*args: str, env: dict | None = None, timeout: float = 1500) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "agfsync_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        pytest.fail(f"agfsync-jax {' '.join(args)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


pytestmark = pytest.mark.slow


# The demo with a VLM judge: the rule-judging local server of tests/conftest.py.
JUDGE_MODEL = "judge-vlm"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, long_judge_server) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("demo") / "workdir"
    url, _ = long_judge_server()
    return workdir, _cli("pipeline", f"--config={CONFIG}", f"--workdir={workdir}", *_judge_flags(url))


def _judge_flags(url: str) -> list[str]:
    return [f"--config.eval.judge.base_url={url}", f"--config.eval.judge.model={JUDGE_MODEL}",
            "--config.eval.judge.api_key_env="]


def _tensorboard_tags(logdir: Path) -> dict[str, list[int]]:
    """{scalar tag: steps} of the event files under `logdir`."""
    from agfsync_jax.tf_cpu import tensorflow_cpu_only

    tf = tensorflow_cpu_only()
    tags: dict[str, list[int]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(int(event.step))
    return tags


def _eval_dir(workdir: Path) -> Path:
    """WORKDIR/eval/<prompt set>/: the demo evaluates one set, the held-out prompts."""
    (set_dir,) = [p for p in (workdir / "eval").iterdir() if p.is_dir()]
    assert set_dir.name.startswith("heldout-")
    return set_dir


def test_demo_writes_report_with_win_rates_and_grids(demo):
    workdir, proc = demo
    match = re.search(r"^report: (.+)$", proc.stdout, re.MULTILINE)
    assert match, proc.stdout[-2000:]
    report = Path(match.group(1))
    assert report == _eval_dir(workdir) / "report.md"
    text = report.read_text()
    # The evaluated prompts are new to the model: none of them is a training prompt.
    train_prompts = {json.loads(line)["prompt"] for line in (workdir / "prompts" / "prompts.jsonl").open()}
    eval_prompts = [json.loads(line)["prompt"] for line in (_eval_dir(workdir) / "prompts.jsonl").open()]
    assert len(eval_prompts) == 96 and not train_prompts & set(eval_prompts)
    assert re.search(r"96 of \d+ prompts, drawn stratified by category", text)
    assert "## Win rates of finetuned over base" in text and "| **all** |" in text
    grids = re.findall(r"!\[grid\]\((grid_\d+\.png)\)", text)
    assert grids and all((report.parent / g).is_file() for g in grids)
    assert (report.parent / "win_rates.png").is_file()
    # TIFA-style VQA accuracy per element type, base and finetuned, from the scorer's answers.
    assert "## VQA accuracy by element type (TIFA-style)" in text and "| element type | questions |" in text
    # The paper's tables: Table 1 (per category, with the tiny HPS v2 model), Table 2 (the judge), Table 3.
    assert "### Table 1 format: win rates by category" in text and "| category | CLIP | Aes. | HPS v2 |" in text
    assert "### Table 3 format: mean scores" in text
    assert "## VLM judge: finetuned vs base (the paper's Table 2)" in text and '"Which image do you prefer?"' in text
    judge = json.loads((_eval_dir(workdir) / "judge" / "summary.json").read_text())
    assert judge["model"] == JUDGE_MODEL and set(judge["questions"]) == {"q1", "q2", "q3"}
    # Every prompt was judged on every question (the rule server always answers in format).
    assert all(q["judged"] == 96 for q in judge["questions"].values())
    # The validation curve: held-out pairs scored every 10 steps, in TensorBoard.
    tags = _tensorboard_tags(workdir / "train" / "tensorboard")
    assert {"val/loss", "val/implicit_acc"} <= set(tags) and len(tags["val/loss"]) == 4
    metrics = json.loads((_eval_dir(workdir) / "metrics.json").read_text())
    accuracy = metrics["vqa_accuracy_by_element_type"]
    assert set(accuracy) == {"base", "finetuned"}
    assert accuracy["base"]["all"]["questions"] == accuracy["finetuned"]["all"]["questions"] >= metrics["num_prompts"]
    for stage_dir in ("prompts", "candidates", "pairs", "train", "export", _eval_dir(workdir).relative_to(workdir)):
        assert (workdir / stage_dir / "_DONE.json").is_file(), stage_dir


def test_closed_loop_finetuned_beats_base_on_training_reward(demo):
    workdir, proc = demo
    metrics = json.loads((_eval_dir(workdir) / "metrics.json").read_text())
    win_rate, sign = metrics["win_rates"]["all"]["total"], metrics["sign_tests"]["total"]
    print(f"win rate of finetuned over base on the total reward: {win_rate:.3f} over "
          f"{metrics['num_prompts']} prompts; sign test {sign}")
    assert win_rate > 0.5 and sign["p_one_sided"] < ALPHA
    assert f"{win_rate:.3f}" in (_eval_dir(workdir) / "report.md").read_text()


# What each stage prints when a re-run finds it complete with unchanged settings.
SKIP_LINES = {
    "prompts": r"^prompts: .*already complete, nothing to do$",
    "sample": r"^sample: 0 generated, \d+ skipped \(done\), 0 regenerated",
    "score": r"^score 00000-of-00001: 0 candidates scored .*\[shard was already done\]$",
    "train": r"^train: complete at step \d+, skipped",
    "export": r"^export: complete .*, skipped$",
    "eval": r"^eval: heldout-\w+ complete, skipped",
}


def test_rerun_skips_every_stage(demo):
    _, first = demo
    proc = _cli(*first.args[3:])  # the demo's own command, judge flags included
    assert list(SKIP_LINES) == [s.name for s in stages.PIPELINE]
    for name, pattern in SKIP_LINES.items():
        assert re.search(pattern, proc.stdout, re.MULTILINE), (name, proc.stdout[-3000:])


def test_changed_setting_is_noticed_by_the_stage_it_affects(demo, tmp_path):
    """A new learning rate on a finished workdir stops `train` with the field and the fix named,
    before any JAX work, and leaves the earlier stages alone."""
    workdir, _ = demo
    proc = subprocess.run([sys.executable, "-m", "agfsync_jax.main", "pipeline", f"--config={CONFIG}",
                           f"--workdir={workdir}", "--config.train.learning_rate=3e-5"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert re.search(r"train.learning_rate changed\); `agfsync-jax clean train --workdir=", proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("agfsync-jax train: error:")[1].split("\n")[0]
    assert re.search(SKIP_LINES["score"], proc.stdout, re.MULTILINE)


def test_local_launcher_trains_with_two_processes(demo, tmp_path):
    workdir, _ = demo
    run_dir = tmp_path / "two-process"
    run_dir.mkdir()
    for name in ("prompts", "base_model", "pairs"):
        shutil.copytree(workdir / name, run_dir / name)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=1", "--",
         sys.executable, "-m", "agfsync_jax.main", "train", f"--config={CONFIG}", f"--workdir={run_dir}",
         "--config.train.steps=2", "--config.train.checkpoint_every=2"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[p0]" in proc.stdout and "[p1]" in proc.stdout
    summary = json.loads((run_dir / "train" / "_DONE.json").read_text())
    assert summary["step"] == 2
    assert (run_dir / "train" / "checkpoints" / "2").is_dir()


def test_two_processes_sample_with_one_tiny_model_build(demo, tmp_path):
    """Every process runs the sample stage, which builds the tiny base model on first use: only
    process 0 may build it (two builders race for WORKDIR/base_model), the other waits."""
    workdir, _ = demo
    run_dir = tmp_path / "two-process-sample"
    run_dir.mkdir()
    shutil.copytree(workdir / "prompts", run_dir / "prompts")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=1", "--",
         sys.executable, "-m", "agfsync_jax.main", "sample", f"--config={CONFIG}", f"--workdir={run_dir}",
         "--config.model.tiny_pretrain_steps=0"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert json.loads((run_dir / "base_model" / "tiny_model.json").read_text())["pretrain_steps"] == 0
    assert (run_dir / "candidates" / "_DONE.json").is_file()
