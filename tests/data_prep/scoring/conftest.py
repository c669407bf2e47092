"""Tiny scorer models and a tiny candidates work directory, built once per session.

The candidate images are real PNGs: random latents decoded by a tiny random diffusers
AutoencoderKL, written in the sampler's layout (candidates/images, candidates/latents,
candidates/manifest-*.jsonl) with the latents saved next to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

LATENT_SHAPE = (4, 16, 16)


@pytest.fixture(scope="session")
def scorer_models(tmp_path_factory) -> dict[str, Path]:
    from data_prep.scoring import tiny

    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": tiny.save_tiny_clip(root / "clip", seed=0),
        "pickscore": tiny.save_tiny_clip(root / "pickscore", seed=0, logit_scale=50.0),
        "aesthetic_clip": tiny.save_tiny_clip(root / "aesthetic_clip", seed=1),
        "aesthetic_head": tiny.save_tiny_aesthetic_head(root / "aesthetic_head.pth", seed=2),
        "blip2_opt": tiny.save_tiny_blip2(root / "blip2_opt", "opt", seed=3),
        "blip2_t5": tiny.save_tiny_blip2(root / "blip2_t5", "t5", seed=4),
    }


@pytest.fixture(scope="session")
def tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=32).eval()


def decode_to_png(vae, latent: np.ndarray, path: Path) -> None:
    """Decodes a (4, 16, 16) latent to a 32 x 32 RGB PNG, as the sampler would."""
    import torch
    from PIL import Image

    with torch.no_grad():
        image = vae.decode(torch.from_numpy(latent)[None] / vae.config.scaling_factor).sample[0]
    # A random VAE's outputs are small; stretch per image so the PNGs are not flat grey.
    image = (image - image.min()) / (image.max() - image.min() + 1e-8)
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_candidates(vae, workdir: Path, records: list[dict], num_candidates: int, seed: int = 0) -> Path:
    """prompts/prompts.jsonl + candidates/ (PNG, .npy latents, one manifest) for `records`."""
    prompts = workdir / "prompts" / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cand_dir = workdir / "candidates"
    rng = np.random.default_rng(seed)
    rows = []
    for rec in records:
        for instruction in range(2 if rec.get("kind") == "instruction_pair" else 1):
            for c in range(num_candidates):
                stem = f"{rec['id']}_{instruction}_{c}"
                latent = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
                (cand_dir / "latents").mkdir(parents=True, exist_ok=True)
                np.save(cand_dir / "latents" / f"{stem}.npy", latent)
                decode_to_png(vae, latent, cand_dir / "images" / f"{stem}.png")
                rows.append({"prompt_id": rec["id"], "candidate": c, "seed": 1000 + c, "noise_sigma": 0.1,
                             "image": f"images/{stem}.png", "latent": f"latents/{stem}.npy",
                             "scheduler": "ddim", "steps": 10, "cfg": 7.5, "instruction": instruction})
    # The last candidate listed twice (as the sampler does after re-sampling), then a torn line.
    text = "".join(json.dumps(r) + "\n" for r in rows + rows[-1:])
    (cand_dir / "manifest-00000-of-00001.jsonl").write_text(text + json.dumps(rows[0])[:30])
    (cand_dir / "_DONE.json").write_text("{}\n")
    return cand_dir


@pytest.fixture(scope="session")
def make_candidates(tiny_vae):
    """write_candidates(workdir, records, num_candidates, seed) with the session's tiny VAE."""
    return lambda workdir, records, num_candidates, seed=0: write_candidates(
        tiny_vae, workdir, records, num_candidates, seed)


@pytest.fixture(scope="session")
def candidate_images(tiny_vae, tmp_path_factory):
    """Six decoded PNG images (PIL) for scorer tests."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(123)
    images = []
    for i in range(6):
        path = root / f"im{i}.png"
        decode_to_png(tiny_vae, rng.standard_normal(LATENT_SHAPE).astype(np.float32), path)
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images
