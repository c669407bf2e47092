"""Stage `sample`: prompts.jsonl -> candidate images, latents and manifest rows (design.md 3, 6).

    agfsync-jax sample --config=configs/tiny.py --workdir=DIR

Each JAX process generates the prompts of its shard (stage shard x process) and appends to its
own manifest shard. A re-run regenerates exactly the candidates that have no manifest row or
whose files do not verify, and writes nothing else; the done marker appears once every
candidate of every prompt has a row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from agfsync_jax import atomic_io, sharding
from agfsync_jax import workdir as workdir_lib
from agfsync_jax.models.dtype_policy import DtypePolicy
from agfsync_jax.models.loading import FAMILY_SDXL, detect_family, load_stable_diffusion
from agfsync_jax.models.tiny import resolve_base_model_on_every_process
from agfsync_jax.sampling import batching, candidates, outputs
from agfsync_jax.sampling.compile_count import CompileCounter
from agfsync_jax.sampling.program import SamplingProgram, check_batch_layout
from agfsync_jax.sampling.schedulers import make_scheduler
from agfsync_jax.sampling.work_plan import Example, ShardSpec, plan_examples, shard_examples
from agfsync_jax.schemas import ManifestRow, read_prompts

# PNG encoding (zlib) releases the GIL; a few threads keep the host ahead of the devices.
_WRITER_THREADS = 4


def _settings(config: Any, family: str) -> dict[str, Any]:
    """Everything that determines the candidates' content (not how fast they are made)."""
    s = config.sampling
    return {"model_path": config.model.path, "model_tiny": config.model.tiny, "family": family,
            "resolution": config.model.resolution, "compute_dtype": config.model.compute_dtype,
            "seed": config.seed, "num_candidates": s.num_candidates, "noise_sigma": s.noise_sigma,
            "clean_first_candidate": s.clean_first_candidate, "pooled_noise_sigma": s.pooled_noise_sigma,
            "shared_initial_latents": s.shared_initial_latents, "scheduler": s.scheduler, "steps": s.steps,
            "guidance_scale": s.guidance_scale, "save_png": s.save_png}


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


def _manifest_row(example: Example, config: Any) -> ManifestRow:
    s = config.sampling
    image, latent = outputs.relative_paths(example.key)
    return ManifestRow(
        prompt_id=example.prompt_id, candidate=example.candidate, seed=example.seed,
        noise_sigma=batching.candidate_noise_sigma(example, s.noise_sigma, s.clean_first_candidate),
        image=image if s.save_png else "", latent=latent, scheduler=s.scheduler, steps=s.steps,
        cfg=float(s.guidance_scale), instruction=example.instruction)


def _global_max(value: int) -> int:
    """The maximum of `value` over processes: every process must run the program equally often."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def _build_program(config: Any, model_path: Path, mesh: Any) -> tuple[SamplingProgram, Any]:
    s = config.sampling
    sd = load_stable_diffusion(model_path, DtypePolicy.from_config(config.model))
    scheduler = make_scheduler(s.scheduler, sd.scheduler_config, s.steps)
    models = candidates.candidate_models(sd, scheduler, config.model.resolution, s.guidance_scale, s.save_png,
                                         attention=s.attention, mesh=mesh)
    program = SamplingProgram(
        models, candidates.model_params(sd, s.save_png), candidates.unconditional(sd), mesh,
        batch_size=s.batch_size, microbatch=s.microbatch, token_length=sd.tokenizers[0].model_max_length,
        guidance_scale=s.guidance_scale, param_mode=s.shard_params,
        min_shard_size=int(config.mesh.min_shard_size))
    return program, sd


class _Writer:
    """Turns a finished batch into files and manifest rows (files first, then the row)."""

    def __init__(self, out_dir: Path, config: Any, manifest: outputs.ManifestWriter, rows_before: dict):
        self.out_dir = out_dir
        self.config = config
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
            row = _manifest_row(example, self.config)
            image = rows["images"][i] if "images" in rows else None
            jobs.append((example, row, self.pool.submit(outputs.write_candidate, self.out_dir, row, latent, image)))
        for example, row, job in jobs:
            job.result()  # re-raises a failed write: the run stops and a re-run redoes it
            # A regenerated candidate keeps its existing (identical) row: rows never repeat.
            if example.key not in self.rows_before:
                self.manifest.append(row)
            self.written += 1
        return sum(e is not None for e in group)

    def close(self) -> None:
        self.pool.shutdown()


@dataclasses.dataclass
class _Plan:
    """What this process has to do, decided before any model is loaded."""

    out_dir: Path
    model_path: Path
    family: str
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
        raise FileNotFoundError(f"{prompts_path}: no prompts; run the `prompts` stage first")
    out_dir = workdir / workdir_lib.CANDIDATES
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_base_model_on_every_process(config, workdir)
    family = detect_family(model_path)
    outputs.check_settings(out_dir, _settings(config, family), write=is_lead)

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
    return _Plan(out_dir, model_path, family, len(records), examples, shard, mine, todo, damaged, rows_before)


def _generate(config: Any, plan: _Plan, mesh: Any, num_batches: int, is_lead: bool) -> _LoopStats:
    """Samples `plan.todo` in `num_batches` fixed-size batches (padding up to the global count)."""
    s = config.sampling
    program, sd = _build_program(config, plan.model_path, mesh)
    groups = list(batching.chunked(plan.todo, program.local_batch_size))
    groups += [[None] * program.local_batch_size] * (num_batches - len(groups))  # in step with other processes
    sdxl_resolution = config.model.resolution if plan.family == FAMILY_SDXL else None
    manifest = outputs.ManifestWriter(plan.out_dir / outputs.manifest_name(
        workdir_lib.shard_suffix(plan.shard.index, plan.shard.count)))
    writer = _Writer(plan.out_dir, config, manifest, plan.rows_before)
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
    plan = _plan(config, Path(workdir), is_lead)
    if plan.todo:
        (plan.out_dir / workdir_lib.DONE_MARKER).unlink(missing_ok=True)
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
        atomic_io.atomic_write_json(plan.out_dir / workdir_lib.DONE_MARKER, {
            "prompts": plan.num_prompts, "candidates": len(plan.examples), "settings": _settings(config, plan.family)})
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
    return summary
