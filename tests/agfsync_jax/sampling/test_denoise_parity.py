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
REL_TOL = 5e-5  # of the largest final latent (step-noise tests)
PROMPTS = ["a red cat sitting on a wooden table", "two blue birds above a snowy mountain at sunset"]
REAL_SD_SCHEDULER_FIELDS = {"clip_sample": False}  # as in SD1.5's and SDXL's scheduler_config.json
_PT_SCHEDULERS = {"ddim": "DDIMScheduler", "dpm_solver": "DPMSolverMultistepScheduler",
                  "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler", "lcm": "LCMScheduler"}


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


# --- step noise (LCM, DDIM with eta > 0) and negative prompts ----------------------------------

def _our_step_noise(num_calls, latents):
    """Our per-candidate step noise (`noise.step_noise`, as `candidates.generate` draws it) for
    every model call, as one array: the JAX side reads it through the same function, PyTorch
    gets the same values in place of its own draws."""
    from agfsync_jax.sampling import candidate_seeds, noise

    keys = np.stack([candidate_seeds.key_data(candidate_seeds.stream_seed(100 + b, candidate_seeds.STEP_NOISE))
                     for b in range(latents.shape[0])])
    fn = functools.partial(noise.step_noise, jnp.asarray(keys), latent_shape=latents.shape[1:])
    return fn, np.stack([np.asarray(fn(jnp.int32(i))) for i in range(num_calls)])


def _replace_pytorch_step_noise(monkeypatch, scheduler, noise):
    """diffusers' LCM and DDIM steps draw their noise with `randn_tensor` in the scheduler's own
    module (the pipelines never draw it elsewhere when latents are passed in); patched there to
    hand out `noise[0], noise[1], ...` in order. Returns the list of draws, to count them."""
    import diffusers.schedulers.scheduling_ddim as scheduling_ddim
    import diffusers.schedulers.scheduling_lcm as scheduling_lcm

    module = {"lcm": scheduling_lcm, "ddim": scheduling_ddim}[scheduler]
    draws = []

    def fake_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == noise.shape[1:], (shape, noise.shape)
        draws.append(len(draws))
        return torch.from_numpy(noise[len(draws) - 1]).to(dtype)

    monkeypatch.setattr(module, "randn_tensor", fake_randn_tensor)
    return draws


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _ours_noisy(denoise_fn, scheduler, params, latents, cond, uncond, step_noise, guidance):
    return denoise(denoise_fn, params, scheduler, latents, cond, uncond, guidance, step_noise)


@pytest.mark.parametrize("family,scheduler,steps,guidance,eta", [
    ("sd1", "lcm", 4, 1.0, 0.0),  # the LCM-LoRA recipe: no CFG batch
    ("sdxl", "lcm", 4, 1.0, 0.0),
    ("sdxl", "lcm", 5, 1.0, 0.0),  # the authors' SDXL steps
    ("sd1", "lcm", 4, 2.0, 0.0),  # LCM with classifier-free guidance
    ("sd1", "ddim", STEPS, GUIDANCE, 0.5),
    ("sdxl", "ddim", STEPS, GUIDANCE, 1.0),
])
def test_noisy_samplers_match_pytorch_pipeline_given_the_same_noise(family, scheduler, steps, guidance, eta,
                                                                     request, monkeypatch):
    path = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    latents, embeds, pooled, neg, neg_pooled = _inputs(sd)
    scheduler_config = {**sd.scheduler_config, **REAL_SD_SCHEDULER_FIELDS}
    sched = schedulers.make_scheduler(scheduler, scheduler_config, steps, eta=eta)
    assert sched.needs_step_noise
    step_noise, noise = _our_step_noise(sched.num_model_calls, latents)
    time_ids = None if pooled is None else sdxl_time_ids(TINY_RESOLUTION, len(PROMPTS))
    guided = guidance > 1
    uncond = Conditioning(neg, neg_pooled, time_ids) if guided else None
    calls = []

    def counting_denoiser(params, x, t, cond):
        jax.debug.callback(lambda n: calls.append(int(n)), x.shape[0])
        return make_denoiser(sd.unet.module)(params, x, t, cond)

    ours = np.asarray(_ours_noisy(counting_denoiser, sched, sd.unet.params, latents,
                                  Conditioning(embeds, pooled, time_ids), uncond, step_noise, guidance))
    jax.effects_barrier()  # every debug callback has run
    # One UNet call per step; with guidance 1 it holds the conditional branch only.
    assert calls == [len(PROMPTS) * (2 if guided else 1)] * steps

    pipe = _pipeline(family, path, scheduler, scheduler_config)
    draws = _replace_pytorch_step_noise(monkeypatch, scheduler, noise)
    kwargs = dict(prompt_embeds=torch.from_numpy(embeds), latents=torch.from_numpy(latents),
                  num_inference_steps=steps, guidance_scale=guidance, height=TINY_RESOLUTION,
                  width=TINY_RESOLUTION, output_type="latent")
    if guided:
        kwargs["negative_prompt_embeds"] = torch.from_numpy(neg)
    if scheduler == "ddim":
        kwargs["eta"] = eta
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.from_numpy(pooled)
        if guided:
            kwargs["negative_pooled_prompt_embeds"] = torch.from_numpy(neg_pooled)
    with torch.no_grad():
        ref = pipe(**kwargs).images.numpy()
    # LCM re-noises after every step but the last; DDIM adds sigma_t * z at every step.
    assert len(draws) == (steps - 1 if scheduler == "lcm" else steps)
    diff, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    print(f"{family} {scheduler} {steps} steps, guidance {guidance}, eta {eta}: max abs diff vs diffusers "
          f"PyTorch pipeline {diff:.2e} (latents up to {scale:.1f})")
    # The random tiny UNets' latents reach 40-75 here, and float32 round-off grows with them:
    # 1-3e-5 of the largest latent in every case, the deterministic ones above included. So the
    # bound is relative; LCM also meets the absolute TOL. (Real SD latents are a few units.)
    assert diff < REL_TOL * scale
    if scheduler == "lcm":
        assert diff < TOL
    # Not vacuous: other step noise gives other latents.
    other = np.asarray(_ours_noisy(make_denoiser(sd.unet.module), sched, sd.unet.params, latents,
                                   Conditioning(embeds, pooled, time_ids), uncond,
                                   lambda i: -step_noise(i), guidance))
    assert float(np.abs(other - ref).max()) > 100 * TOL


NEGATIVE_PROMPT = "blurry, low quality, watermark"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_negative_prompt_matches_pytorch_pipeline(family, request):
    """`candidates.unconditional(sd, negative_prompt)` against the pipelines' `negative_prompt`,
    which PyTorch encodes itself (SDXL: both encoders and the pooled embedding)."""
    from agfsync_jax.sampling.candidates import unconditional

    path = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    latents, embeds, pooled, _, _ = _inputs(sd)
    scheduler_config = {**sd.scheduler_config, **REAL_SD_SCHEDULER_FIELDS}
    sched = schedulers.make_scheduler("ddim", scheduler_config, STEPS)
    time_ids = None if pooled is None else sdxl_time_ids(TINY_RESOLUTION, len(PROMPTS))
    negative = unconditional(sd, NEGATIVE_PROMPT)
    b = len(PROMPTS)
    neg = np.broadcast_to(negative.embeds, (b,) + negative.embeds.shape[1:])
    neg_pooled = None if pooled is None else np.broadcast_to(negative.pooled, (b,) + negative.pooled.shape[1:])
    ours = np.asarray(_ours(make_denoiser(sd.unet.module), sched, sd.unet.params, latents,
                            Conditioning(embeds, pooled, time_ids), Conditioning(neg, neg_pooled, time_ids)))

    pipe = _pipeline(family, path, "ddim", scheduler_config)
    kwargs = dict(prompt_embeds=torch.from_numpy(embeds), negative_prompt=[NEGATIVE_PROMPT] * b,
                  latents=torch.from_numpy(latents), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="latent")
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.from_numpy(pooled)
    with torch.no_grad():
        ref = pipe(**kwargs).images.numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"{family} negative prompt: max abs diff vs diffusers PyTorch pipeline {diff:.2e}")
    assert diff < TOL
    # Not vacuous: the negative prompt changed the result against the default negative branch.
    default = unconditional(sd)
    default_neg = np.broadcast_to(default.embeds, neg.shape)
    default_pooled = None if pooled is None else np.broadcast_to(default.pooled, neg_pooled.shape)
    plain = np.asarray(_ours(make_denoiser(sd.unet.module), sched, sd.unet.params, latents,
                             Conditioning(embeds, pooled, time_ids), Conditioning(default_neg, default_pooled, time_ids)))
    assert float(np.abs(plain - ref).max()) > 100 * TOL
