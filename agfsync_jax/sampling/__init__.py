"""Candidate sampling (docs/design.md section 6): N noisy-embedding candidates per prompt, on a mesh.

    schedulers      diffusers' Flax schedulers driven by step index, fixed to match PyTorch;
                    LCM and stochastic DDIM in JAX; which one (the folder's by default)
    denoise         the pure, jittable denoising core (explicit latents and embeddings)
    candidate_seeds stable per-candidate seeds and JAX key data
    noise           initial latents, embedding noise and step noise from per-example keys
    model_setup     the UNet parameters to sample with (where a sampling LoRA is merged)
    decode          final latents -> uint8 images
    candidates      one batch: tokens + keys -> latents + images (pure)
    program         that function jitted over the mesh, compiled once
    work_plan       prompts x instructions x candidates, sharded by prompt
    batching        fixed-size padded host batches
    outputs         files, manifests, verification, settings
    stage           the `sample` stage
"""
