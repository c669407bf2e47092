"""The denoising core against diffusers' PyTorch pipelines: same weights, latents and embeddings.

The tiny folders store a PNDM (SD1.x) or Euler (SDXL) scheduler config without `clip_sample`,
so switching to DDIM falls back to DDIM's default `clip_sample=True`; the real SD1.5 and SDXL
scheduler configs set it to False, and so do we here. With clipping, the random tiny UNet's x0
predictions sit far outside [-1, 1] and the trajectory becomes chaotic: in PyTorch alone, a
1e-4 change of the initial latents moves the final latents by 0.15, so no float32
reimplementation can agree to 1e-3 there (the clipping rule itself is covered against the
PyTorch scheduler in test_schedulers.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agfsync_jax.models.text_encoding import encode_tokens, sdxl_time_ids, tokenize
from agfsync_jax.tiny.pipeline import TINY_RESOLUTION
from agfsync_jax.sampling import schedulers
from agfsync_jax.models.denoiser import Conditioning, make_denoiser
from agfsync_jax.sampling.denoise import denoise

STEPS = 10
GUIDANCE = 7.5
TOL = 1e-3
PROMPTS = ["a red cat sitting on a wooden table", "two blue birds above a snowy mountain at sunset"]
REAL_SD_SCHEDULER_FIELDS = {"clip_sample": False}  # as in SD1.5's and SDXL's scheduler_config.json
_PT_SCHEDULERS = {"ddim": "DDIMScheduler", "dpm_solver": "DPMSolverMultistepScheduler",
                  "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler"}


def _inputs(sd):
    ids = tokenize(sd.tokenizers, PROMPTS)
    emb = encode_tokens(sd.family, [e.module for e in sd.text_encoders], [e.params for e in sd.text_encoders],
                        jnp.asarray(ids))
    latent_hw = TINY_RESOLUTION // sd.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal(
        (len(PROMPTS), sd.latent_channels, latent_hw, latent_hw)).astype(np.float32)
    embeds = np.asarray(emb.embeds)
    pooled = None if emb.pooled is None else np.asarray(emb.pooled)
    # SDXL pipelines use zeros for an empty negative prompt; SD1.x encodes "" (any fixed tensor
    # exercises the same code path, so we take the encoding of "" for SD1.x too).
    if pooled is None:
        empty = encode_tokens(sd.family, [e.module for e in sd.text_encoders], [e.params for e in sd.text_encoders],
                              jnp.asarray(tokenize(sd.tokenizers, [""] * len(PROMPTS))))
        neg, neg_pooled = np.asarray(empty.embeds), None
    else:
        neg, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
    return latents, embeds, pooled, neg, neg_pooled


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ours(denoise_fn, scheduler, params, latents, cond, uncond):
    return denoise(denoise_fn, params, scheduler, latents, cond, uncond, GUIDANCE)


def _pipeline(family, path, scheduler, scheduler_config):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    pipe.scheduler = getattr(diffusers, _PT_SCHEDULERS[scheduler]).from_config(scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """XLA's CPU threads stay around after a JAX call; PyTorch's own pool then fights them for
    the cores and runs ~20x slower. One PyTorch thread avoids that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family,scheduler", [("sd1", "ddim"), ("sd1", "dpm_solver"), ("sdxl", "ddim")])
def test_final_latents_match_pytorch_pipeline(family, scheduler, request):
    path = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    latents, embeds, pooled, neg, neg_pooled = _inputs(sd)
    scheduler_config = {**sd.scheduler_config, **REAL_SD_SCHEDULER_FIELDS}
    sched = schedulers.make_scheduler(scheduler, scheduler_config, STEPS)
    time_ids = None if pooled is None else sdxl_time_ids(TINY_RESOLUTION, len(PROMPTS))
    ours = np.asarray(_ours(make_denoiser(sd.unet.module), sched, sd.unet.params, latents,
                            Conditioning(embeds, pooled, time_ids), Conditioning(neg, neg_pooled, time_ids)))

    pipe = _pipeline(family, path, scheduler, scheduler_config)
    kwargs = dict(prompt_embeds=torch.from_numpy(embeds), negative_prompt_embeds=torch.from_numpy(neg),
                  latents=torch.from_numpy(latents), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="latent")
    if pooled is not None:
        kwargs.update(pooled_prompt_embeds=torch.from_numpy(pooled),
                      negative_pooled_prompt_embeds=torch.from_numpy(neg_pooled))
    with torch.no_grad():
        ref = pipe(**kwargs).images.numpy()
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    print(f"{family} {scheduler}: max abs diff vs diffusers PyTorch pipeline {diff:.2e} "
          f"(latents up to {np.abs(ref).max():.1f})")
    assert diff < TOL
    # Not vacuous: guidance and denoising moved the latents far from where they started.
    assert float(np.abs(ref - latents).max()) > 100 * TOL
