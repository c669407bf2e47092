"""Sampling throughput: our compiled sampler vs diffusers' PyTorch pipeline, same model and batch.

    python -m benchmarks.sampling --model=tiny
    python -m benchmarks.sampling --model=wide128 --batch=4

Both sides get the same random-weight model folder (built here, saved with `save_pretrained`,
loaded back by each side's own loader), the same prompts, scheduler, steps and guidance, and
produce latents (`--decode` adds the VAE decode on both sides). Both include text encoding.
PyTorch runs first, before JAX starts its CPU thread pool, so the two never compete for cores.

Reported: compile time (separately), first-call and steady-state seconds per batch (median and
best of `--repeats`), images/s, the ratio ours / PyTorch, and XLA's cost-analysis FLOPs of our
compiled program. Writes benchmarks/results/sampling-<model>.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a red cat sitting on a wooden table", "two blue birds above a snowy mountain at sunset",
           "a cup of coffee next to a cake", "a wooden boat on a lake at night"]

def model_folder(name: str, cache: Path) -> tuple[Path, int]:
    """The model folder of a size of benchmarks/common.py (built once, then reused) and its resolution."""
    folder = cache / f"sampling-{name}"
    if not folder.exists():
        common.build_torch_pipeline(name).save_pretrained(folder, safe_serialization=True)
    return folder, common.SIZES[name].resolution


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def _steady(times: list[float], batch: int) -> dict[str, Any]:
    """Median and best of the timed calls. On a shared machine the best is the least disturbed."""
    median, best = statistics.median(times), min(times)
    return {"median_s": median, "best_s": best, "all_s": times, "images_per_s": batch / median,
            "images_per_s_best": batch / best}


def bench_pytorch(folder: Path, args: argparse.Namespace, resolution: int) -> dict[str, Any]:
    import diffusers
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    scheduler_cls = {"ddim": diffusers.DDIMScheduler, "dpm_solver": diffusers.DPMSolverMultistepScheduler,
                     "euler": diffusers.EulerDiscreteScheduler, "pndm": diffusers.PNDMScheduler}[args.scheduler]
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    generator = torch.Generator().manual_seed(0)

    def call():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=resolution,
                 width=resolution, generator=generator, output_type="pil" if args.decode else "latent")
    first, times = _timed(call, args.repeats)
    return {"first_call_s": first, **_steady(times, args.batch), "threads": torch.get_num_threads(),
            "version": torch.__version__}


def bench_ours(folder: Path, args: argparse.Namespace, resolution: int) -> dict[str, Any]:
    import jax
    import ml_collections

    from agfsync_jax import sharding
    from agfsync_jax.models.loading import load_stable_diffusion
    from agfsync_jax.sampling import batching, candidates, schedulers
    from agfsync_jax.sampling.compile_count import CompileCounter
    from agfsync_jax.sampling.program import SamplingProgram
    from agfsync_jax.sampling.work_plan import Example

    sd = load_stable_diffusion(folder)
    scheduler = schedulers.make_scheduler(args.scheduler, sd.scheduler_config, args.steps)
    models = candidates.candidate_models(sd, scheduler, resolution, args.guidance, args.decode)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    microbatch = args.microbatch or args.batch // mesh.devices.size
    program = SamplingProgram(models, candidates.model_params(sd, args.decode), candidates.unconditional(sd), mesh,
                              batch_size=args.batch, microbatch=microbatch, token_length=77,
                              guidance_scale=args.guidance)
    sampling = ml_collections.ConfigDict(dict(noise_sigma=0.1, clean_first_candidate=False, pooled_noise_sigma=0.0,
                                              shared_initial_latents=False))
    examples = [Example(f"p{i}", i, 0, 0, PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(args.batch)]
    batch = batching.host_batch(examples, tokenizers=sd.tokenizers, sampling=sampling, global_seed=0,
                                sdxl_resolution=None)
    with CompileCounter() as compiles:
        program.compile()

        def call():
            program.local_rows(program(batch))  # waits for the results on the host
        first, times = _timed(call, args.repeats)
    steady = _steady(times, args.batch)
    return {"compile_s": program.compile_seconds, "first_call_s": first, **steady,
            "xla_flops_per_call": program.flops,
            "achieved_gflops_per_s": (program.flops or 0.0) / steady["best_s"] / 1e9, "microbatch": microbatch,
            "xla_compilations": compiles.count, "devices": [str(d) for d in jax.devices()],
            "version": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "wide128"), default="tiny")
    parser.add_argument("--batch", type=int, default=8, help="images per call (global batch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm_solver", "euler", "pndm"))
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--microbatch", type=int, default=0, help="0: the whole per-device batch in one UNet call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch_threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument("--decode", action="store_true", help="also decode images with the VAE (both sides)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "agfsync-bench"),
                        help="where the random-weight model folders are kept between runs")
    args = parser.parse_args()

    folder, resolution = model_folder(args.model, Path(args.cache))
    torch_result = bench_pytorch(folder, args, resolution)  # first: no XLA threads exist yet
    ours = bench_ours(folder, args, resolution)
    result = {
        "model": args.model, "resolution": resolution, "batch": args.batch, "steps": args.steps,
        "scheduler": args.scheduler, "guidance": args.guidance, "decode": args.decode,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "ours": ours, "pytorch": torch_result, "speedup": ours["images_per_s"] / torch_result["images_per_s"],
        "speedup_best": ours["images_per_s_best"] / torch_result["images_per_s_best"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sampling-{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"sampling[{args.model}, {resolution}px, batch {args.batch}, {args.steps} {args.scheduler} steps]: "
          f"ours {ours['images_per_s']:.2f} img/s (compile {ours['compile_s']:.1f} s, "
          f"{(ours['xla_flops_per_call'] or 0) / 1e9:.1f} GFLOP/call), "
          f"PyTorch {torch_result['images_per_s']:.2f} img/s -> {result['speedup']:.2f}x "
          f"(best of {args.repeats}: {result['speedup_best']:.2f}x)  ({out})")


if __name__ == "__main__":
    main()
