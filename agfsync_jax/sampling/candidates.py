"""Candidate generation for one batch: tokens + keys -> final latents (+ images). Pure, jittable.

For each example: encode its prompt, add sigma-scaled Gaussian noise to the conditional
embedding (its own key), draw its initial latents (its own key), denoise with classifier-free
guidance against the clean unconditional (or negative-prompt) embedding, drawing any step noise
from its own key, and decode. The mesh-sharded, compiled
wrapper around this function is `program.SamplingProgram`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from agfsync_jax.models.loading import FAMILY_SDXL, StableDiffusion
from agfsync_jax.models.text_encoding import encode_tokens, tokenize, unconditional_embeddings
from agfsync_jax.sampling import decode, noise
from agfsync_jax.models.denoiser import Conditioning, Denoiser, make_denoiser
from agfsync_jax.sampling.denoise import denoise
from agfsync_jax.sampling.schedulers import Scheduler

# Per-example fields of a batch (leading dim B):
#   token_ids     (B, E, L) int32    prompt tokens for each of the E text encoders
#   latent_keys   (B, 2) uint32      key data of the initial latents
#   step_noise_keys (B, 2) uint32    key data of the noise injected between steps (LCM, DDIM eta > 0)
#   noise_keys    (B, 2) uint32      key data of the embedding noise
#   embeds_sigma  (B,) float32       noise scale on the conditional embedding (0: clean)
#   pooled_sigma  (B,) float32       noise scale on SDXL's pooled embedding (0 by default)
#   time_ids      (B, 6) float32     SDXL only
BATCH_FIELDS = ("token_ids", "latent_keys", "step_noise_keys", "noise_keys", "embeds_sigma", "pooled_sigma")
SDXL_BATCH_FIELDS = BATCH_FIELDS + ("time_ids",)


@dataclasses.dataclass(frozen=True, eq=False)
class CandidateModels:
    """The static half of candidate generation: modules, scheduler and shapes (no parameters)."""

    family: str
    text_encoders: tuple[Any, ...]
    denoise_fn: Denoiser
    vae: Any | None  # None: return latents only
    vae_config: Mapping[str, Any]
    scheduler: Scheduler
    latent_shape: tuple[int, int, int]
    guided: bool  # classifier-free guidance on (diffusers: guidance_scale > 1)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        return SDXL_BATCH_FIELDS if self.family == FAMILY_SDXL else BATCH_FIELDS


def conditioning(models: CandidateModels, text_params: Any, batch: Mapping[str, jax.Array]) -> Conditioning:
    """The clean conditional text conditioning of a batch."""
    emb = encode_tokens(models.family, models.text_encoders, text_params, jnp.moveaxis(batch["token_ids"], 1, 0))
    return Conditioning(emb.embeds, emb.pooled, batch.get("time_ids"))


def generate(models: CandidateModels, params: Mapping[str, Any], batch: Mapping[str, jax.Array],
             uncond: Conditioning, guidance_scale: jax.Array) -> dict[str, jax.Array]:
    """Final latents (B, C, h, w) float32 and, with a VAE, images (B, H, W, 3) uint8.

    Args:
        params: {"text": per-encoder params, "unet": ..., "vae": ...}.
        batch: the fields in `models.batch_fields`.
        uncond: the unconditional conditioning with batch 1 (embeds (1, L, D), SDXL pooled
            (1, P)); broadcast to the batch, never perturbed. Its time ids are the batch's.
            `batch["step_noise_keys"]` is read only by schedulers that inject step noise.
    """
    cond = conditioning(models, params["text"], batch)
    cond = noise.perturb_conditioning(cond, batch["noise_keys"], batch["embeds_sigma"], batch["pooled_sigma"])
    b = cond.embeds.shape[0]
    negative = None
    if models.guided:
        negative = Conditioning(
            jnp.broadcast_to(uncond.embeds, cond.embeds.shape).astype(jnp.float32),
            None if uncond.pooled is None
            else jnp.broadcast_to(uncond.pooled, (b,) + uncond.pooled.shape[1:]).astype(jnp.float32),
            cond.time_ids)
    latents = noise.initial_latents(batch["latent_keys"], models.latent_shape)
    step_noise = None
    if models.scheduler.needs_step_noise:
        step_noise = functools.partial(noise.step_noise, batch["step_noise_keys"], latent_shape=models.latent_shape)
    final = denoise(models.denoise_fn, params["unet"], models.scheduler, latents, cond, negative, guidance_scale,
                    step_noise)
    out = {"latents": final}
    if models.vae is not None:
        out["images"] = decode.decode_to_uint8(models.vae, params["vae"], models.vae_config, final)
    return out


def latent_shape(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], resolution: int,
                 where: str = "") -> tuple[int, int, int]:
    """(C, h, w) of the latents for square images of `resolution` pixels."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)  # as StableDiffusion.vae_scale_factor
    # The UNet halves the latents once per down block but the last.
    unet_factor = 2 ** (len(unet_config["block_out_channels"]) - 1)
    if resolution % (vae_factor * unet_factor):
        raise ValueError(f"model.resolution={resolution} must be a multiple of {vae_factor * unet_factor} "
                         f"(VAE factor {vae_factor} x UNet factor {unet_factor}) {where}")
    return (int(unet_config["in_channels"]), resolution // vae_factor, resolution // vae_factor)


def candidate_models(sd: StableDiffusion, scheduler: Scheduler, resolution: int, guidance_scale: float,
                     decode_images: bool, attention: str = "diffusers", mesh: Mesh | None = None) -> CandidateModels:
    """The static half of `generate` for a model loaded with its VAE (used only if decode_images).

    `attention` is the UNet's attention kernel (`sampling.attention`, one of
    `agfsync_jax.models.attention.ATTENTION_KINDS`) for programs over `mesh`.
    """
    if sd.vae is None:
        raise ValueError(f"{sd.path}: load the VAE too (its config fixes the latent shape)")
    return CandidateModels(
        family=sd.family, text_encoders=tuple(e.module for e in sd.text_encoders),
        denoise_fn=make_denoiser(sd.unet.module, attention=attention, mesh=mesh, attention_field="sampling.attention"),
        vae=sd.vae.module if decode_images else None, vae_config=dict(sd.vae.config),
        scheduler=scheduler, latent_shape=latent_shape(sd.unet.config, sd.vae.config, resolution, f"({sd.path})"),
        # diffusers runs classifier-free guidance only for guidance_scale > 1.
        guided=guidance_scale > 1.0)


def model_params(sd: StableDiffusion, decode_images: bool) -> dict[str, Any]:
    """The parameter tree `generate` takes (host arrays)."""
    params: dict[str, Any] = {"text": tuple(e.params for e in sd.text_encoders), "unet": sd.unet.params}
    if decode_images:
        params["vae"] = sd.vae.params
    return params


def unconditional(sd: StableDiffusion, negative_prompt: str = "") -> Conditioning:
    """The clean negative branch of classifier-free guidance (batch 1).

    Without a negative prompt: the encoding of "" or, for SDXL, zeros (the pipelines'
    `negative_prompt=None`). With one (sampling.negative_prompt): its encoding by every text
    encoder, SDXL's pooled embedding included, as the pipelines' `negative_prompt` gives.
    """
    ids = jnp.asarray(tokenize(sd.tokenizers, [negative_prompt]))
    encoders = tuple(e.module for e in sd.text_encoders)
    encoded = jax.jit(lambda params, ids: encode_tokens(sd.family, encoders, params, ids))(
        tuple(e.params for e in sd.text_encoders), ids)
    negative = encoded if negative_prompt else unconditional_embeddings(sd, encoded, encoded)
    return Conditioning(np.asarray(negative.embeds, np.float32),
                        None if negative.pooled is None else np.asarray(negative.pooled, np.float32))
