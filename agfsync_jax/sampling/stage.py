"""Stage `sample`: prompts.jsonl -> candidate images, latents and manifest rows (docs/design.md sections 3, 6).

    agfsync-jax sample --config=configs/tiny.py --workdir=DIR

Each JAX process generates the prompts of its shard (stage shard x process) and appends to its
own manifest shard. A re-run regenerates exactly the candidates that have no manifest row or
whose files do not verify, and writes nothing else; the done marker appears once every
candidate of every prompt has a row. Candidates that failed (non-finite latents) get no row:
the stage then raises after writing the others, so the command exits non-zero, no done marker
appears, and a re-run retries exactly the failed ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from agfsync_jax import base_model, done_marker, fingerprint, sharding, storage
from agfsync_jax import workdir as workdir_lib
from agfsync_jax.base_model import resolve_base_model_on_every_process
from agfsync_jax.errors import MissingInputError, StageFailedError
from agfsync_jax.models.dtype_policy import DtypePolicy
from agfsync_jax.models.loading import FAMILY_SDXL, detect_family, load_stable_diffusion
from agfsync_jax.sampling import batching, candidates, model_setup, outputs, schedulers
from agfsync_jax.sampling.compile_count import CompileCounter
from agfsync_jax.sampling.program import SamplingProgram, check_batch_layout
from agfsync_jax.sampling.work_plan import Example, ShardSpec, plan_examples, shard_examples
from agfsync_jax.schemas import ManifestRow, read_prompts
from agfsync_jax.storage import Path, PathLike

# PNG encoding (zlib) releases the GIL; a few threads keep the host ahead of the devices.
_WRITER_THREADS = 4


class CandidatesFailedError(StageFailedError):
    """Some candidates could not be made; the others are saved."""


# Fields that change how fast candidates are made, not what they are. With sampling.shard_params
# the last bits may depend on the mesh (see configs/common.py); that is accepted as "the same".
IGNORED = ("sampling.batch_size", "sampling.microbatch", "sampling.shard_params") + base_model.COVERED_BY_IDENTITY


def settings(config: Any, workdir: PathLike) -> dict[str, Any]:
    """Everything that determines the candidates' content: the model, sampling and seed fields
    (all but IGNORED), the base model's identity (which fixes what sampling.scheduler="" resolves
    to), a sampling LoRA's identity and the prompts they were sampled for."""
    prompts = done_marker.read(storage.as_path(workdir) / workdir_lib.PROMPTS) or {}
    return {**fingerprint.config_settings(config, ("seed", "model", "sampling"), IGNORED),
            **base_model.model_identity(config), **model_setup.lora_identity(config.sampling.lora_path),
            "inputs.prompts": prompts.get(done_marker.FINGERPRINT, "")}


def _scheduler(config: Any, model_path: Path) -> schedulers.Scheduler:
    """The sampler's scheduler from the folder's scheduler_config.json (no model load)."""
    path = model_path / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_path}: component 'scheduler' has no scheduler_config.json ({path})")
    scheduler_config = json.loads(path.read_text())
    s = config.sampling
    name = schedulers.resolve_name(s.scheduler, scheduler_config, str(path))
    if name == "lcm" and not s.lora_path and scheduler_config.get("_class_name") != "LCMScheduler":
        # A few LCM steps of a UNet that was never consistency-distilled give no clean image.
        logging.warning("sample: sampling.scheduler='lcm' without sampling.lora_path on %s (its scheduler is %s): "
                        "the UNet must already be LCM-distilled, e.g. with an LCM-LoRA fused in", model_path,
                        scheduler_config.get("_class_name"))
    return schedulers.make_scheduler(name, scheduler_config, s.steps, eta=s.eta)


def _latent_shape_on_disk(model_path: Path, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the saved latents from the folder's configs: verifying a finished run should
    not cost a model load."""
    configs = {}
    for component in ("unet", "vae"):
        path = model_path / component / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_path}: component '{component}' has no config.json ({path})")
        configs[component] = json.loads(path.read_text())
    return candidates.latent_shape(configs["unet"], configs["vae"], resolution, f"({model_path})")


def _manifest_row(example: Example, config: Any, scheduler: str) -> ManifestRow:
    s = config.sampling
    image, latent = outputs.relative_paths(example.key)
    return ManifestRow(
        prompt_id=example.prompt_id, candidate=example.candidate, seed=example.seed,
        noise_sigma=batching.candidate_noise_sigma(example, s.noise_sigma, s.clean_first_candidate),
        image=image if s.save_png else "", latent=latent, scheduler=scheduler, steps=s.steps,
        cfg=float(s.guidance_scale), instruction=example.instruction)


def _global_max(value: int) -> int:
    """The maximum of `value` over processes: every process must run the program equally often."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def _build_program(config: Any, model_path: Path, scheduler: schedulers.Scheduler,
                   mesh: Any) -> tuple[SamplingProgram, Any]:
    s = config.sampling
    sd = load_stable_diffusion(model_path, DtypePolicy.from_config(config.model),
                               variant=config.model.variant)
    models = candidates.candidate_models(sd, scheduler, config.model.resolution, s.guidance_scale, s.save_png,
                                         attention=s.attention, mesh=mesh)
    params = candidates.model_params(sd, s.save_png)
    params["unet"] = model_setup.sampling_unet_params(sd, s.lora_path, s.lora_scale)
    program = SamplingProgram(
        models, params, candidates.unconditional(sd, s.negative_prompt), mesh,
        batch_size=s.batch_size, microbatch=s.microbatch, token_length=sd.tokenizers[0].model_max_length,
        guidance_scale=s.guidance_scale, param_mode=s.shard_params,
        min_shard_size=int(config.mesh.min_shard_size))
    return program, sd


class _Writer:
    """Turns a finished batch into files and manifest rows (files first, then the row)."""

    def __init__(self, out_dir: Path, config: Any, scheduler: str, manifest: outputs.ManifestWriter,
                 rows_before: dict):
        self.out_dir = out_dir
        self.config = config
        self.scheduler = scheduler
        self.manifest = manifest
        self.rows_before = rows_before
        self.pool = ThreadPoolExecutor(_WRITER_THREADS)
        self.written = 0
        self.failed: list[str] = []

    def write(self, group: list[Example | None], rows: dict[str, np.ndarray]) -> int:
        jobs = []
        for i, example in enumerate(group):
            if example is None:
                continue
            latent = rows["latents"][i]
            if not np.isfinite(latent).all():
                self.failed.append(f"{example.key}: non-finite latents")
                continue
            row = _manifest_row(example, self.config, self.scheduler)
            image = rows["images"][i] if "images" in rows else None
            jobs.append((example, row, self.pool.submit(outputs.write_candidate, self.out_dir, row, latent, image)))
        for example, row, job in jobs:
            job.result()  # re-raises a failed write: the run stops and a re-run redoes it
            # A regenerated candidate keeps its existing (identical) row: rows never repeat.
            if example.key not in self.rows_before:
                self.manifest.append(row)
            self.written += 1
        self.manifest.flush()  # the batch's rows, after its files
        return sum(e is not None for e in group)

    def close(self) -> None:
        self.pool.shutdown()


@dataclasses.dataclass
class _Plan:
    """What this process has to do, decided before any model is loaded."""

    out_dir: Path
    model_path: Path
    family: str
    scheduler: schedulers.Scheduler
    num_prompts: int
    examples: list[Example]  # every shard's
    shard: ShardSpec
    mine: list[Example]
    todo: list[Example]  # mine, without a row or with files that do not verify
    damaged: int
    rows_before: dict


@dataclasses.dataclass
class _LoopStats:
    generated: int = 0
    failed: tuple[str, ...] = ()
    loop_seconds: float = 0.0
    compile_seconds: float = 0.0
    compilations: int = 0
    sharded_param_arrays: int = 0


def _plan(config: Any, workdir: Path, is_lead: bool) -> _Plan:
    s = config.sampling
    prompts_path = workdir / workdir_lib.PROMPTS_FILE
    if not prompts_path.is_file():
        raise MissingInputError(f"{prompts_path}: no prompts; run the `prompts` stage first")
    out_dir = workdir / workdir_lib.CANDIDATES
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_base_model_on_every_process(config, workdir)
    family = detect_family(model_path)
    model_setup.check_lora_settings(s.lora_path, s.lora_scale)
    scheduler = _scheduler(config, model_path)
    outputs.check_settings(out_dir, settings(config, workdir), write=is_lead, workdir=workdir)

    records = read_prompts(prompts_path)
    examples = plan_examples(records, s.num_candidates, config.seed)
    shard = ShardSpec.of(config.shard.index, config.shard.count, jax.process_index(), jax.process_count())
    mine = shard_examples(examples, shard)
    latent_shape = _latent_shape_on_disk(model_path, config.model.resolution)
    image_size = config.model.resolution if s.save_png else None

    outputs.remove_stale_temp_files(out_dir, {e.prompt_id for e in mine})
    rows_before, duplicates = outputs.read_manifests(out_dir)
    if duplicates:
        logging.warning("sample: %d duplicate manifest rows in %s (the first of each is used)", duplicates, out_dir)
    todo, damaged = [], 0
    for example in mine:
        row = rows_before.get(example.key)
        reason = None if row is None else outputs.verify_candidate(out_dir, row, latent_shape, image_size)
        if reason is not None:
            damaged += 1
            logging.warning("sample: regenerating %s: %s", example.key, reason)
        if row is None or reason is not None:
            todo.append(example)
    return _Plan(out_dir, model_path, family, scheduler, len(records), examples, shard, mine, todo, damaged,
                 rows_before)


def _generate(config: Any, plan: _Plan, mesh: Any, num_batches: int, is_lead: bool) -> _LoopStats:
    """Samples `plan.todo` in `num_batches` fixed-size batches (padding up to the global count)."""
    s = config.sampling
    program, sd = _build_program(config, plan.model_path, plan.scheduler, mesh)
    groups = list(batching.chunked(plan.todo, program.local_batch_size))
    groups += [[None] * program.local_batch_size] * (num_batches - len(groups))  # in step with other processes
    sdxl_resolution = config.model.resolution if plan.family == FAMILY_SDXL else None
    manifest = outputs.ManifestWriter(plan.out_dir / outputs.manifest_name(
        workdir_lib.shard_suffix(plan.shard.index, plan.shard.count)))
    writer = _Writer(plan.out_dir, config, plan.scheduler.name, manifest, plan.rows_before)
    try:
        with CompileCounter() as counter:
            program.compile()
            start = time.perf_counter()
            pending = None
            with tqdm(total=len(plan.todo), desc="sample", unit="img", disable=not is_lead) as progress:
                for group in groups:
                    batch = batching.host_batch(group, tokenizers=sd.tokenizers, sampling=s, global_seed=config.seed,
                                                sdxl_resolution=sdxl_resolution)
                    out = program(batch)
                    # The devices sample this batch while the host writes the previous one.
                    if pending is not None:
                        progress.update(writer.write(pending[0], program.local_rows(pending[1])))
                    pending = (group, out)
                if pending is not None:
                    progress.update(writer.write(pending[0], program.local_rows(pending[1])))
            loop_seconds = time.perf_counter() - start
    finally:
        writer.close()
        manifest.close()
    if counter.count > 1:
        logging.warning("sample: %d XLA compilations, expected 1 (the sampling program)", counter.count)
    for reason in writer.failed:
        logging.error("sample: failed %s", reason)
    return _LoopStats(writer.written, tuple(writer.failed), loop_seconds, program.compile_seconds, counter.count,
                      program.sharded_param_arrays)


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Generates every missing or damaged candidate of this process's shard; returns the summary."""
    from agfsync_jax import distributed

    distributed.initialize()  # under a multi-process launcher; a no-op for one process
    is_lead = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    check_batch_layout(config.sampling.batch_size, config.sampling.microbatch, mesh.devices.size,
                       jax.process_count())
    plan = _plan(config, storage.as_path(workdir), is_lead)
    if plan.todo and is_lead:
        done_marker.clear(plan.out_dir)
    local_batch = config.sampling.batch_size // jax.process_count()
    num_batches = _global_max(math.ceil(len(plan.todo) / local_batch))
    logging.info("sample: shard %d/%d: %d candidates, %d done, %d to generate in %d batches",
                 plan.shard.index, plan.shard.count, len(plan.mine), len(plan.mine) - len(plan.todo),
                 len(plan.todo), num_batches)
    # No work anywhere: no model load, no compilation.
    stats = _generate(config, plan, mesh, num_batches, is_lead) if num_batches else _LoopStats()

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sample: all shards written")
    rows_after, _ = outputs.read_manifests(plan.out_dir)
    missing = outputs.missing_keys((e.key for e in plan.examples), rows_after)
    if not missing and is_lead:
        done_marker.write(plan.out_dir, {"prompts": plan.num_prompts, "candidates": len(plan.examples)},
                          settings(config, workdir))
    summary = {
        "candidates": len(plan.mine), "generated": stats.generated, "skipped_done": len(plan.mine) - len(plan.todo),
        "regenerated_damaged": plan.damaged, "failed": len(stats.failed),
        "images_per_s": stats.generated / stats.loop_seconds if stats.generated else 0.0,
        "compile_s": round(stats.compile_seconds, 2), "xla_compilations": stats.compilations,
        "sharded_param_arrays": stats.sharded_param_arrays, "complete": not missing,
    }
    print(f"sample: {stats.generated} generated, {summary['skipped_done']} skipped (done), {plan.damaged} "
          f"regenerated (damaged), {len(stats.failed)} failed{' (non-finite latents)' if stats.failed else ''} "
          f"in {stats.loop_seconds:.1f} s ({summary['images_per_s']:.2f} images/s; compile "
          f"{stats.compile_seconds:.1f} s, {stats.compilations} XLA compilation(s)); "
          f"{len(plan.examples) - len(missing)}/{len(plan.examples)} candidates of all shards done -> {plan.out_dir}",
          flush=True)
    if stats.failed:
        shown = "; ".join(stats.failed[:3]) + (" ..." if len(stats.failed) > 3 else "")
        raise CandidatesFailedError(
            f"sample: {len(stats.failed)} candidate(s) failed ({shown}); the {stats.generated} that "
            f"succeeded are saved and the stage is not marked done. Re-run `sample` to retry the "
            f"failed ones; if they fail again the model computes non-finite values (check the "
            f"weights and model.compute_dtype)")
    return summary
