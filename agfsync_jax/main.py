"""The `agfsync-jax` command: one subcommand per pipeline stage.

    agfsync-jax STAGE --config=configs/tiny.py --workdir=DIR [--config.train.learning_rate=1e-6 ...]

Every stage module exposes `run(config, workdir)`; this file only parses flags and dispatches.
Stages are imported lazily so that `agfsync-jax prompts` never starts JAX or PyTorch.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# stage name -> ("module", "function", one-line help). Only stages that exist are listed.
STAGES: dict[str, tuple[str, str, str]] = {
    "tiny-model": ("agfsync_jax.models.tiny", "run", "build the tiny random base model"),
    "prompts": ("data_prep.prompts.stage", "run",
                "write prompts, yes-questions and instruction pairs (prompts/prompts.jsonl)"),
    "sample": ("agfsync_jax.sampling.stage", "run",
               "sample N candidates per prompt: images, latents, manifests (candidates/)"),
    "score": ("data_prep.scoring.stage", "run",
              "score candidates (VQA, CLIP, aesthetic) and write the pair dataset (scores/, pairs/)"),
    "train": ("agfsync_jax.training.stage", "run", "Diffusion-DPO finetuning of the UNet (train/)"),
    "export": ("agfsync_jax.export", "run", "trained UNet -> diffusers PyTorch pipeline folder"),
    "eval": ("agfsync_jax.evaluation.stage", "run", "base vs finetuned: win rates, scores, image grids"),
    "pipeline": ("agfsync_jax.pipeline", "run", "every stage in order, skipping finished ones"),
    "plan": ("agfsync_jax.plan.stage", "run",
             "compile (never run) train step and sampler for TPU topologies: memory, FLOPs, fit"),
}
# Stages that read and write no work directory.
_NO_WORKDIR = ("plan",)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the run (stage artifacts).")
flags.DEFINE_string("topology", None, "plan: TPU slices to plan for, comma-separated chip grids or "
                    "accelerator types (v5p:2x2x1,v5e:2x4,v5e-8,v6e-8,v4-8)")
flags.DEFINE_string("plan_out", None, "plan: also write the plan as JSON to this file")


def _usage() -> str:
    lines = ["usage: agfsync-jax STAGE --config=CONFIG --workdir=DIR [--config.x.y=value ...]",
             "", "stages:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in STAGES.items()]
    return "\n".join(lines)


def _main(argv: list[str], stage: str) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or (_WORKDIR.value is None and stage not in _NO_WORKDIR):
        raise app.UsageError("--config and --workdir are required\n" + _usage())
    module_name, fn_name, _ = STAGES[stage]
    if stage != "prompts":  # the prompts stage must not pay for importing diffusers
        from agfsync_jax.log_noise import quiet_third_party_logs

        quiet_third_party_logs()
    logging.info("stage %s, workdir %s", stage, _WORKDIR.value)
    getattr(importlib.import_module(module_name), fn_name)(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    """Console-script entry: `agfsync-jax STAGE ...`."""
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(_usage(), file=sys.stderr)
        sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
    stage = sys.argv[1]
    argv = [f"{sys.argv[0]} {stage}"] + sys.argv[2:]
    app.run(lambda a: _main(a, stage), argv=argv)


if __name__ == "__main__":
    run()
