"""Tiny, randomly initialised Stable Diffusion pipelines of the real PyTorch classes.

No machine we test on can download weights, so tests and `make demo` build these (fixed seed,
tokenizer written in code: `agfsync_jax.tiny.tokenizer`), save them with `save_pretrained`, and
load them back through exactly the path a user's SD1.5 or SDXL folder takes (`models.loading`).
`agfsync_jax.tiny.build` saves (and optionally pretrains) one; `agfsync_jax.base_model` decides
when a run uses one.
"""

from __future__ import annotations

from typing import Any

from agfsync_jax.tiny.tokenizer import clip_tokenizer

FAMILIES = ("sd1", "sdxl")
# Pixel resolution of the tiny models: the tiny VAE downsamples by 2, so latents are 16 x 16.
TINY_RESOLUTION = 32


def _text_config(vocab_size: int, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu", architectures=["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"])


def _vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=TINY_RESOLUTION, scaling_factor=scaling_factor)


def build_tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A tiny random diffusers PyTorch pipeline (StableDiffusion or StableDiffusionXL)."""
    import torch
    from diffusers import (EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    tokenizer, vocab_size = clip_tokenizer()
    # The real SD schedule (scaled-linear betas 0.00085..0.012, leading spacing, offset 1).
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", steps_offset=1)
    torch.manual_seed(seed)
    if family == "sd1":
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), norm_num_groups=32)
        vae = _vae(0.18215)
        text_encoder = CLIPTextModel(_text_config(vocab_size, with_projection=False))
        scheduler = PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False)
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=32)
    vae = _vae(0.13025)
    text_encoder = CLIPTextModel(_text_config(vocab_size, with_projection=False))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, with_projection=True))
    scheduler = EulerDiscreteScheduler(**schedule, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)
