"""Sampling throughput: our compiled sampler vs diffusers' PyTorch pipeline, same model and batch.

    python benchmarks/sampling.py --model=tiny
    python benchmarks/sampling.py --model=mid --batch=4

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

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a red cat sitting on a wooden table", "two blue birds above a snowy mountain at sunset",
           "a cup of coffee next to a cake", "a wooden boat on a lake at night"]

# Mid-size: SD1.5's UNet widths (320, 640, 1280) and cross-attention width 768, one layer per
# block and three levels instead of two and four (316M UNet parameters), at 128 px.
MID_RESOLUTION = 128


def build_mid_pipeline(seed: int = 0) -> Any:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from agfsync_jax.tiny.tokenizer import write_tokenizer_files

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt",
                                  pad_token="<|endoftext|>", model_max_length=77)
    unet = UNet2DConditionModel(
        sample_size=MID_RESOLUTION // 8, block_out_channels=(320, 640, 1280), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)
    # An SD-shaped VAE (factor 8) with narrow widths: only --decode uses it.
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        sample_size=MID_RESOLUTION, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, hidden_act="quick_gelu"))
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True,
                              set_alpha_to_one=False)
    # SD1.5's scheduler_config.json also carries DDIM's clip_sample=False; switching to DDIM reads it.
    scheduler.register_to_config(clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def model_folder(name: str, cache: Path) -> tuple[Path, int]:
    """The model folder (built once, then reused) and its resolution."""
    from agfsync_jax.tiny import build as tiny_build, pipeline as tiny

    folder = cache / f"sampling-{name}"
    if name == "tiny":
        if not folder.exists():
            tiny_build.save_tiny_pipeline("sd1", folder, seed=0)
        return folder, tiny.TINY_RESOLUTION
    if not folder.exists():
        build_mid_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder, MID_RESOLUTION


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
    parser.add_argument("--model", choices=("tiny", "mid"), default="tiny")
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
