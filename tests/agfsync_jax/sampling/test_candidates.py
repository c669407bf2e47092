"""Candidate generation: what the UNet actually sees, inspected at every call.

A spy wraps the real UNet and records the cross-attention context (and SDXL's pooled
embeddings) of every call, so the tests check the conditioning inside the compiled loop rather
than the inputs we meant to pass.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from agfsync_jax.tiny.pipeline import TINY_RESOLUTION
from agfsync_jax.sampling import batching, candidates, schedulers
from agfsync_jax.sampling.work_plan import Example

SIGMA = 0.1
STEPS = 2
NUM = 3  # candidates of one prompt


def _spy(models):
    calls = []

    def record(context, text_embeds):
        calls.append((np.asarray(context), None if text_embeds is None else np.asarray(text_embeds)))

    def denoise_fn(params, x, t, cond):
        jax.debug.callback(record, cond.embeds, cond.pooled)
        return models.denoise_fn(params, x, t, cond)
    return dataclasses.replace(models, denoise_fn=denoise_fn), calls


def _setup(sd, scheduler="ddim", guidance=7.5, negative_prompt=""):
    sched = schedulers.make_scheduler(scheduler, sd.scheduler_config, STEPS)
    models = candidates.candidate_models(sd, sched, TINY_RESOLUTION, guidance, decode_images=False)
    models, calls = _spy(models)
    sampling = ml_collections.ConfigDict(dict(noise_sigma=SIGMA, clean_first_candidate=True, pooled_noise_sigma=0.0,
                                              shared_initial_latents=False))
    examples = [Example("p0", 0, 0, c, "a red cat sitting on a wooden table", 100 + c) for c in range(NUM)]
    batch = batching.host_batch(examples, tokenizers=sd.tokenizers, sampling=sampling, global_seed=0,
                                sdxl_resolution=TINY_RESOLUTION if sd.family == "sdxl" else None)
    # Same initial latents for every candidate: any difference between them comes from the
    # embedding noise alone.
    batch["latent_keys"][:] = batch["latent_keys"][0]
    params = candidates.model_params(sd, decode_images=False)
    uncond = candidates.unconditional(sd, negative_prompt)
    run = jax.jit(lambda params, batch: candidates.generate(models, params, batch, uncond, guidance)["latents"])
    clean = jax.jit(lambda params, batch: candidates.conditioning(models, params["text"], batch))(params, batch)
    return run, params, batch, uncond, clean, calls


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_noise_goes_on_the_conditional_branch_only(family, request):
    sd = request.getfixturevalue(f"tiny_{family}")
    run, params, batch, uncond, clean, calls = _setup(sd)
    if family == "sdxl":
        batch["pooled_sigma"][2] = 1.0  # the authors' pooled noise, opted into for one candidate
    latents = np.asarray(run(params, batch))
    assert len(calls) == STEPS
    for context, pooled in calls:
        uncond_rows, cond_rows = context[0::2], context[1::2]  # branches are interleaved
        # The unconditional branch is the clean negative embedding, bit for bit, at every step.
        for row in uncond_rows:
            np.testing.assert_array_equal(row, uncond.embeds[0])
        noise = cond_rows - np.asarray(clean.embeds)
        assert np.abs(noise[0]).max() < 1e-5  # candidate 0 stays clean (clean_first_candidate)
        for c in (1, 2):
            assert noise[c].std() == pytest.approx(SIGMA, rel=0.1)
            assert abs(noise[c].mean()) < 0.01
        assert not np.allclose(noise[1], noise[2])  # each candidate has its own noise
        if family == "sdxl":
            np.testing.assert_array_equal(pooled[0::2], np.zeros_like(pooled[0::2]))  # SDXL: zeros
            pooled_noise = pooled[1::2] - np.asarray(clean.pooled)
            # No noise on the pooled embedding unless asked for (docs/design.md section 10).
            assert np.abs(pooled_noise[:2]).max() < 1e-5
            assert pooled_noise[2].std() == pytest.approx(1.0, rel=0.35)
    # Same initial latents, different embedding noise: the candidates differ.
    assert not np.array_equal(latents[0], latents[1]) and not np.array_equal(latents[1], latents[2])

    # Sigma 0 everywhere (a traced input: same program, no recompilation): identical candidates.
    batch["embeds_sigma"][:] = 0.0
    batch["pooled_sigma"][:] = 0.0
    latents = np.asarray(run(params, batch))
    np.testing.assert_array_equal(latents[1], latents[0])
    np.testing.assert_array_equal(latents[2], latents[0])
    assert run._cache_size() == 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lcm_at_guidance_one_runs_one_conditional_unet_call_per_step(family, request):
    """The LCM-LoRA recipe (guidance 1): no classifier-free guidance batch, B rows per call."""
    sd = request.getfixturevalue(f"tiny_{family}")
    run, params, batch, _, clean, calls = _setup(sd, scheduler="lcm", guidance=1.0)
    batch["embeds_sigma"][:] = 0.0
    np.asarray(run(params, batch))
    jax.effects_barrier()  # every debug callback has run
    assert len(calls) == STEPS
    for context, pooled in calls:
        np.testing.assert_allclose(context, np.asarray(clean.embeds), atol=1e-6)  # B rows, all conditional
        if family == "sdxl":
            np.testing.assert_allclose(pooled, np.asarray(clean.pooled), atol=1e-6)


def test_step_noise_comes_from_each_candidates_own_key(tiny_sd1):
    """Same initial latents and embeddings everywhere: LCM candidates then differ only through
    their step-noise keys; equal keys give bitwise equal candidates."""
    run, params, batch, _, _, _ = _setup(tiny_sd1, scheduler="lcm", guidance=1.0)
    batch["embeds_sigma"][:] = 0.0
    assert len(set(map(tuple, batch["step_noise_keys"]))) == NUM  # host_batch: one key per candidate
    latents = np.asarray(run(params, batch))
    assert not np.array_equal(latents[0], latents[1]) and not np.array_equal(latents[1], latents[2])
    batch["step_noise_keys"][2] = batch["step_noise_keys"][0]
    again = np.asarray(run(params, batch))
    np.testing.assert_array_equal(again[2], again[0])
    np.testing.assert_array_equal(again[:2], latents[:2])  # other rows untouched: deterministic
    # DDIM (eta 0) ignores the step-noise keys altogether.
    run, params, batch, _, _, _ = _setup(tiny_sd1, scheduler="ddim")
    before = np.asarray(run(params, batch))
    batch["step_noise_keys"][:] = 7
    np.testing.assert_array_equal(np.asarray(run(params, batch)), before)


def test_shared_initial_latents_also_share_the_step_noise(tiny_sd1):
    """As in the authors' sampler (one default-seeded generator per call), candidate i of every
    prompt gets the same initial latents and the same step noise; otherwise each its own."""
    examples = [Example(p, 0, 0, c, "a cat", 100 * i + c) for i, p in enumerate(["p0", "p1"]) for c in range(2)]

    def keys(shared):
        sampling = ml_collections.ConfigDict(dict(noise_sigma=SIGMA, clean_first_candidate=False,
                                                  pooled_noise_sigma=0.0, shared_initial_latents=shared))
        batch = batching.host_batch(examples, tokenizers=tiny_sd1.tokenizers, sampling=sampling, global_seed=0,
                                    sdxl_resolution=None)
        return batch["latent_keys"], batch["step_noise_keys"]

    for k in keys(shared=True):
        np.testing.assert_array_equal(k[0], k[2])  # candidate 0 of p0 and p1
        assert not np.array_equal(k[0], k[1])
    latent_keys, step_keys = keys(shared=False)
    assert len({tuple(k) for k in step_keys}) == 4 and not np.array_equal(latent_keys, step_keys)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_negative_prompt_is_the_unconditional_branch(family, request):
    sd = request.getfixturevalue(f"tiny_{family}")
    run, params, batch, uncond, _, calls = _setup(sd, negative_prompt="blurry, low quality")
    default = candidates.unconditional(sd)
    assert not np.allclose(uncond.embeds, default.embeds)
    if family == "sdxl":  # a negative prompt replaces SDXL's zeros, pooled embedding included
        assert np.abs(uncond.pooled).max() > 0 and not np.allclose(uncond.pooled, default.pooled)
    np.asarray(run(params, batch))
    jax.effects_barrier()  # every debug callback has run
    for context, pooled in calls:
        for row in context[0::2]:
            np.testing.assert_array_equal(row, uncond.embeds[0])
        if family == "sdxl":
            np.testing.assert_array_equal(pooled[0::2], np.broadcast_to(uncond.pooled, pooled[0::2].shape))
