"""The stage table: every `agfsync-jax` subcommand, once, in pipeline order.

`main.py` dispatches subcommands from it and `pipeline.py` runs its pipeline stages in order.
Each stage module exposes `run(config, workdir) -> summary dict`; modules are named, not
imported, so that reading the table (e.g. `agfsync-jax --help`, or the pipeline checking done
markers) starts neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses

from agfsync_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    module: str  # exposes run(config, workdir) -> dict
    help: str
    # The WORKDIR entries the stage writes (what `agfsync-jax clean STAGE` removes).
    owns: tuple[str, ...] = ()
    in_pipeline: bool = False
    # Stages that never touch JAX devices or diffusers skip the third-party log set-up.
    light: bool = False
    needs_workdir: bool = True


STAGES: tuple[Stage, ...] = (
    Stage("tiny-model", "agfsync_jax.tiny.stage", "build the tiny base model into WORKDIR/base_model",
          owns=(workdir_lib.BASE_MODEL,)),
    Stage("prompts", "data_prep.prompts.stage",
          "write prompts, yes-questions and instruction pairs (prompts/prompts.jsonl)",
          owns=(workdir_lib.PROMPTS,), in_pipeline=True, light=True),
    Stage("sample", "agfsync_jax.sampling.stage",
          "sample N candidates per prompt: images, latents, manifests (candidates/)",
          owns=(workdir_lib.CANDIDATES,), in_pipeline=True),
    Stage("score", "data_prep.scoring.stage",
          "score candidates (VQA, CLIP, aesthetic) and write the pair dataset (scores/, pairs/)",
          owns=(workdir_lib.SCORES, workdir_lib.PAIRS), in_pipeline=True),
    Stage("encode", "agfsync_jax.encoding.stage",
          "an external image dataset (folder, JSONL, parquet) -> the pair dataset through the VAE encoder "
          "(pairs/; instead of prompts, sample and score)", owns=(workdir_lib.PAIRS,)),
    Stage("train", "agfsync_jax.training.stage", "Diffusion-DPO finetuning of the UNet (train/)",
          owns=(workdir_lib.TRAIN,), in_pipeline=True),
    Stage("export", "agfsync_jax.export.stage", "trained UNet -> diffusers PyTorch pipeline folder (export/)",
          owns=(workdir_lib.EXPORT,), in_pipeline=True),
    Stage("eval", "agfsync_jax.evaluation.stage", "base vs finetuned: win rates, scores, image grids (eval/)",
          owns=(workdir_lib.EVAL,), in_pipeline=True),
    Stage("judge", "data_prep.judge.stage",
          "a VLM judge compares base and finetuned images of an eval set (run by `eval` when eval.judge.* is set; "
          "--workdir=WORKDIR/eval/<set>)", light=True),
    Stage("plan", "agfsync_jax.plan.stage",
          "compile (never run) the train step and sampler for TPU topologies (--topology=v5p:2x2x1,v5e-8): "
          "per-chip memory against HBM, FLOPs, what to change when it does not fit", needs_workdir=False),
    Stage("pipeline", "agfsync_jax.pipeline", "every pipeline stage in order, skipping finished ones"),
    Stage("clean", "agfsync_jax.clean", "remove a stage's artifacts so that the next run redoes it "
          "(agfsync-jax clean STAGE --workdir=DIR)", light=True),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE: tuple[Stage, ...] = tuple(s for s in STAGES if s.in_pipeline)


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]
