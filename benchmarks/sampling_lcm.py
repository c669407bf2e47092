"""Candidate sampling cost: LCM (4 steps, guidance 1) vs DDIM (50 steps, guidance 7.5), one run.

    python -m benchmarks.sampling_lcm [--batch=1] [--lcm_steps=4] [--ddim_repeats=2]

Measured (CPU, here): images/s of our compiled sampler (`SamplingProgram`, text encoding
included, no VAE decode) on the "mid" model of benchmarks/common.py, both samplers in the same
process on the same folder, their timed calls alternated so both see the same machine load.
The weights are random and no LCM-LoRA is merged: a merged LoRA leaves the UNet's shape, hence
the cost per image, unchanged, so this measures the schedule (steps x CFG batch), not quality.

Counted (no hardware needed): FLOPs per image at full SD1.5 (512 px) and SDXL (1024 px) size,
UNet from the analytical counter in benchmarks/flops.py, VAE decode from
torch.utils.flop_counter on the meta device, and the cost of the paper's dataset (45.8K prompts
x 8 candidates) under each sampler. Writes benchmarks/results/sampling_lcm.json.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common, flops

PAPER_PROMPTS = 45_800  # the paper's dataset (section 1, contribution 1)
PAPER_CANDIDATES = 8  # N = 8 candidates per prompt
PROMPTS = ["a red cat sitting on a wooden table", "two blue birds above a snowy mountain at sunset",
           "a cup of coffee next to a cake", "a wooden boat on a lake at night"]

# The Stable Diffusion VAE (SD1.x and SDXL share its architecture).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="images per compiled call")
    p.add_argument("--lcm_steps", type=int, default=4)
    p.add_argument("--lcm_guidance", type=float, default=1.0)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--ddim_guidance", type=float, default=7.5)
    p.add_argument("--lcm_repeats", type=int, default=5, help="timed calls after the first")
    p.add_argument("--ddim_repeats", type=int, default=2, help="timed calls after the first")
    p.add_argument("--peak_flops", type=float, default=flops.H100_BF16_DENSE,
                   help="device peak for the wall-time estimate (default: one H100, bf16 dense)")
    p.add_argument("--assumed_mfu", type=float, default=0.4, help="assumed MFU for the wall-time estimate")
    p.add_argument("--tag", default="sampling_lcm")
    return p.parse_args(argv)


def vae_decode_flops(resolution: int) -> float:
    """torch.utils.flop_counter's count of one SD VAE decode (latents -> resolution px image)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE, sample_size=resolution)
        z = torch.zeros(1, 4, resolution // 8, resolution // 8)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vae.decode(z)
    return float(counter.get_total_flops())


def unet_calls_per_image(steps: int, guidance: float) -> int:
    """UNet forwards per image: one per step, twice with classifier-free guidance (g > 1)."""
    return steps * (2 if guidance > 1 else 1)


def cost_per_image(size: str, steps: int, guidance: float) -> dict[str, float]:
    spec = common.SIZES[size]
    unet = flops.unet_forward_flops(common.unet_config(size), spec.latent_size, spec.text_len).total
    text = sum(flops.clip_text_flops(h, layers, i, spec.text_len) for h, layers, i in flops.TEXT_ENCODERS[size])
    calls = unet_calls_per_image(steps, guidance)
    out = {"unet_forward": unet, "unet_calls": calls, "unet": calls * unet, "text_encoder": text}
    out["without_decode"] = out["unet"] + text
    out["vae_decode"] = vae_decode_flops(spec.resolution) if size in ("sd15", "sdxl") else float("nan")
    out["with_decode"] = out["without_decode"] + out["vae_decode"]
    return out


class _Sampler:
    """One sampler configuration compiled as the `sample` stage compiles it."""

    def __init__(self, sd: Any, name: str, steps: int, guidance: float, batch: int):
        import ml_collections

        from agfsync_jax import sharding
        from agfsync_jax.sampling import batching, candidates, schedulers
        from agfsync_jax.sampling.program import SamplingProgram
        from agfsync_jax.sampling.work_plan import Example

        # The benchmark folder's PNDM config lacks DDIM's clip_sample; SD1.5's sets it False.
        scheduler = schedulers.make_scheduler(name, {**sd.scheduler_config, "clip_sample": False}, steps)
        models = candidates.candidate_models(sd, scheduler, common.SIZES["mid"].resolution, guidance,
                                             decode_images=False)
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
        self.program = SamplingProgram(models, candidates.model_params(sd, False), candidates.unconditional(sd),
                                       mesh, batch_size=batch, microbatch=batch // mesh.devices.size,
                                       token_length=77, guidance_scale=guidance)
        sampling = ml_collections.ConfigDict(dict(noise_sigma=0.1, clean_first_candidate=False,
                                                  pooled_noise_sigma=0.0, shared_initial_latents=False))
        examples = [Example(f"p{i}", i, 0, 0, PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(batch)]
        self.batch = batching.host_batch(examples, tokenizers=sd.tokenizers, sampling=sampling, global_seed=0,
                                         sdxl_resolution=None)
        self.info = {"scheduler": name, "steps": steps, "guidance": guidance, "batch": batch,
                     "unet_calls_per_image": unet_calls_per_image(steps, guidance),
                     "unet_batch_per_call": batch * (2 if guidance > 1 else 1)}
        self.times: list[float] = []

    def compile(self) -> None:
        self.program.compile()
        self.info["compile_s"] = self.program.compile_seconds
        self.info["xla_flops_per_call"] = self.program.flops

    def __call__(self) -> float:
        start = time.perf_counter()
        self.program.local_rows(self.program(self.batch))  # waits for the results on the host
        return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from agfsync_jax.models.loading import load_stable_diffusion
    from agfsync_jax.sampling.compile_count import CompileCounter

    with common.saved_pipeline("mid") as (_, path):
        sd = load_stable_diffusion(path)
    lcm = _Sampler(sd, "lcm", args.lcm_steps, args.lcm_guidance, args.batch)
    ddim = _Sampler(sd, "ddim", args.ddim_steps, args.ddim_guidance, args.batch)
    load_before = os.getloadavg()
    with CompileCounter() as compiles:
        lcm.compile()
        ddim.compile()
        first = {"lcm": lcm(), "ddim": ddim()}
        # Alternate the timed calls so that both samplers see the same machine load.
        for r in range(max(args.lcm_repeats, args.ddim_repeats)):
            for sampler, repeats in ((lcm, args.lcm_repeats), (ddim, args.ddim_repeats)):
                if r < repeats:
                    sampler.times.append(sampler())
    out = {}
    mid_unet = flops.unet_forward_flops(common.unet_config("mid"), common.SIZES["mid"].latent_size).total
    for key, sampler in (("lcm", lcm), ("ddim", ddim)):
        stats = common.summarise(sampler.times)
        out[key] = {**sampler.info, "first_call_s": first[key], "timed_s": sampler.times, **stats,
                    "images_per_s": args.batch / stats["median_s"],
                    "analytical_unet_flops_per_call": args.batch * sampler.info["unet_calls_per_image"] * mid_unet}
    out["speedup_images_per_s"] = out["lcm"]["images_per_s"] / out["ddim"]["images_per_s"]
    out["xla_compilations"] = compiles.count
    out["loadavg_before_after"] = [load_before, os.getloadavg()]
    return out


def paper_cost(args: argparse.Namespace, lcm_steps_sdxl: int) -> dict[str, Any]:
    """FLOPs per image at full size and for the paper's 45.8K x 8 candidates under each sampler."""
    images = PAPER_PROMPTS * PAPER_CANDIDATES
    configs = {
        "sd15": {"ddim50_cfg7.5": (args.ddim_steps, args.ddim_guidance), "lcm4_g1": (args.lcm_steps, 1.0)},
        "sdxl": {"ddim50_cfg7.5": (args.ddim_steps, args.ddim_guidance), "lcm4_g1": (args.lcm_steps, 1.0),
                 f"lcm{lcm_steps_sdxl}_g1 (authors' SDXL recipe)": (lcm_steps_sdxl, 1.0)},
    }
    dpo = flops.model_flops("sd15")["dpo_pair"]["total"] * 1000 * 128  # the paper's SD1.5 run
    sustained = args.peak_flops * args.assumed_mfu
    out: dict[str, Any] = {"images": images, "sd15_dpo_run_flops": dpo,
                           "wall_time_assumption": {"peak_flops": args.peak_flops, "mfu": args.assumed_mfu}}
    for size, samplers in configs.items():
        for name, (steps, guidance) in samplers.items():
            per_image = cost_per_image(size, steps, guidance)
            total = images * per_image["with_decode"]
            out[f"{size}/{name}"] = {
                "steps": steps, "guidance": guidance, "per_image": per_image,
                "dataset_flops_with_decode": total, "dataset_flops_without_decode": images * per_image["without_decode"],
                "x_sd15_dpo_run": total / dpo,
                "assumed_device_hours": total / sustained / 3600}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    result = {"model": "mid", "resolution": common.SIZES["mid"].resolution, "args": vars(args),
              "measured_cpu": measure(args), "counted_full_size": paper_cost(args, lcm_steps_sdxl=5)}
    path = common.write_result(args.tag, result)
    m = result["measured_cpu"]
    print(f"mid ({result['resolution']} px), batch {args.batch}: LCM {args.lcm_steps} steps g={args.lcm_guidance}: "
          f"{m['lcm']['images_per_s']:.3f} img/s (median {m['lcm']['median_s']:.2f} s/call); DDIM {args.ddim_steps} "
          f"steps g={args.ddim_guidance}: {m['ddim']['images_per_s']:.4f} img/s (median {m['ddim']['median_s']:.1f} "
          f"s/call) -> {m['speedup_images_per_s']:.1f}x")
    for key, row in result["counted_full_size"].items():
        if isinstance(row, dict) and "per_image" in row:
            p = row["per_image"]
            print(f"{key}: {p['with_decode'] / 1e12:.3g} TFLOP/image ({p['unet_calls']} UNet calls x "
                  f"{p['unet_forward'] / 1e12:.3g} + VAE {p['vae_decode'] / 1e12:.3g} + text "
                  f"{p['text_encoder'] / 1e12:.3g}); 45.8K x 8: {row['dataset_flops_with_decode'] / 1e18:.3g} EFLOP "
                  f"= {row['x_sd15_dpo_run']:.3g}x the SD1.5 DPO run; {row['assumed_device_hours']:.3g} device-h "
                  f"at an assumed {args.assumed_mfu:.0%} MFU")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
