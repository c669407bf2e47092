"""What every benchmark script shares: model sizes, machine info, timing, XLA accounting, output.

Model sizes (one definition, so the DPO-step, sampling and memory benchmarks measure the same
networks):

    tiny   agfsync_jax.tiny.pipeline's SD1 pipeline: 32 px images, 16 x 16 latents, UNet channels
           (32, 64). Seconds per step; shows fixed overheads (dispatch, optimizer, launches).
    mid    an SD1.5-shaped pipeline scaled down to run on a laptop CPU: the same block layout
           (3 cross-attention down blocks + 1 plain, mid block, mirrored up blocks, 2 resnets per
           level, 8 heads), channels (64, 128, 256, 256), a 4-layer 256-wide CLIP text encoder,
           256 px images with 32 x 32 latents. 1/93 of SD1.5's UNet FLOPs per image.
    wide128  SD1.5's UNet widths (320, 640, 1280) and cross-attention width 768, but three levels
           and one resnet per level (316 M UNet parameters), a 4-layer 768-wide text encoder and a
           narrow factor-8 VAE, at 128 px (16 x 16 latents): the sampling benchmark's model, whose
           kernels have SD1.5's sizes.
    sd15   the runwayml SD1.5 configuration (UNet 860 M parameters, CLIP ViT-L/14 text encoder,
           the SD VAE) with random weights: 512 px, 64 x 64 latents. For accelerator runs.

All are built as real diffusers / transformers PyTorch classes with random weights (fixed seed)
and a tokenizer written in code; nothing is downloaded. `saved_pipeline` writes one with
`save_pretrained` so the JAX side loads it through `agfsync_jax.models.loading`, the path a
user's folder takes. SDXL exists here only as a UNet config (`unet_config("sdxl")`), for the
memory plan, which never materialises weights.

Run the scripts from the repository root as modules, e.g. `python -m benchmarks.dpo_step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL_SIZES = ("tiny", "mid", "wide128", "sd15")

# The runwayml/stable-diffusion-v1-5 UNet (diffusers' defaults are SD1.x's, except these).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)

# stabilityai/stable-diffusion-xl-base-1.0's UNet.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)

# SD1.5's widths, three levels, one resnet per level (the sampling benchmark's model).
WIDE128_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)

# The mid-size UNet: SD1.5's layout at 1/5 of its width.
MID_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    name: str
    resolution: int  # pixels
    latent_size: int  # latent height = width
    text_len: int = 77


SIZES = {
    "tiny": SizeSpec("tiny", 32, 16),
    "mid": SizeSpec("mid", 256, 32),
    "wide128": SizeSpec("wide128", 128, 16),
    "sd15": SizeSpec("sd15", 512, 64),
    "sdxl": SizeSpec("sdxl", 1024, 128),
}


def unet_config(size: str) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel kwargs of a size (tiny: read from the built model)."""
    if size == "tiny":
        from agfsync_jax.tiny.pipeline import build_tiny_pipeline

        return dict(build_tiny_pipeline("sd1").unet.config)
    return dict({"mid": MID_UNET, "wide128": WIDE128_UNET, "sd15": SD15_UNET, "sdxl": SDXL_UNET}[size])


def _text_encoder(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu", architectures=["CLIPTextModel"]))


def build_torch_pipeline(size: str, seed: int = 0) -> Any:
    """A diffusers PyTorch StableDiffusionPipeline of `size` with random weights (fp32)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from agfsync_jax.tiny.pipeline import build_tiny_pipeline
    from agfsync_jax.tiny.tokenizer import write_tokenizer_files

    if size == "tiny":
        return build_tiny_pipeline("sd1", seed)
    if size not in ("mid", "wide128", "sd15"):
        raise ValueError(f"unknown model size {size!r}; expected one of {MODEL_SIZES}")
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt",
                                  pad_token="<|endoftext|>", model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(size))
    if size == "mid":
        text_encoder = _text_encoder(vocab_size, hidden=256, layers=4, heads=4, intermediate=1024)
        vae_channels, vae_layers = (32, 64, 128, 128), 1
    elif size == "wide128":
        text_encoder = _text_encoder(vocab_size, hidden=768, layers=4, heads=12, intermediate=3072)
        vae_channels, vae_layers = (32, 64, 64, 64), 1
    else:  # CLIP ViT-L/14's text tower (the vocabulary is our small one; FLOPs barely change)
        text_encoder = _text_encoder(vocab_size, hidden=768, layers=12, heads=12, intermediate=3072)
        vae_channels, vae_layers = (128, 256, 512, 512), 2
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=vae_layers, norm_num_groups=32, sample_size=SIZES[size].resolution,
        scaling_factor=0.18215)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True,
                              set_alpha_to_one=False)
    # SD1.5's scheduler_config.json also carries DDIM's clip_sample=False; switching to DDIM reads it.
    scheduler.register_to_config(clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@contextlib.contextmanager
def saved_pipeline(size: str, seed: int = 0) -> Iterator[tuple[Any, Path]]:
    """(PyTorch pipeline, folder it was saved to as safetensors); the folder is removed after."""
    pipe = build_torch_pipeline(size, seed)
    with tempfile.TemporaryDirectory(prefix=f"agfsync-bench-{size}-") as tmp:
        path = Path(tmp) / "model"
        pipe.save_pretrained(path, safe_serialization=True)
        yield pipe, path


# --- machine and output ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, accelerators, library versions."""
    import jax
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    devices = jax.devices()
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in devices],
        "jax_device_kind": devices[0].device_kind,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.cuda.is_available(),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, result: Mapping[str, Any], out_dir: str | Path = RESULTS_DIR) -> Path:
    """benchmarks/results/<name>.json with the machine, time and revision added."""
    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    full = dict(result)
    full.setdefault("machine", machine_info())
    full["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    full["git"] = git_revision()
    out.write_text(json.dumps(full, indent=2, sort_keys=False, default=float) + "\n")
    return out


def summarise(times: list[float]) -> dict[str, float]:
    """Median is the headline: the machine is shared, and the median ignores one-off stalls."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "mean_s": statistics.fmean(times), "n": len(times)}


# --- XLA accounting ------------------------------------------------------------------------------


def xla_flops(compiled: Any) -> float | None:
    """FLOPs of one execution of a compiled program, from XLA's cost analysis (None if absent).

    XLA counts a multiply-add as 2 FLOPs, like the analytical counts in benchmarks/flops.py.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def xla_memory(compiled: Any) -> dict[str, int] | None:
    """Per-device bytes of a compiled program from XLA's memory analysis.

    peak_estimate = arguments + outputs - aliased (donated buffers reused as outputs) + temps +
    generated code: what must be resident at once while the program runs.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    mem = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    mem["peak_estimate"] = (mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
                            + mem["generated_code"])
    return mem


def mfu(flops_per_s: float | None, peak_flops: float | None) -> float | None:
    if not flops_per_s or not peak_flops:
        return None
    return flops_per_s / peak_flops


def fmt_rate(x: float | None, unit: str = "FLOP/s") -> str:
    if x is None:
        return "n/a"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"
