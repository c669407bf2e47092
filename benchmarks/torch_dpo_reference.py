"""A PyTorch Diffusion-DPO step in the style of the official trainer (Wallace et al. 2023).

Used only as the side-by-side baseline in benchmarks/dpo_step.py: diffusers' PyTorch UNet as
the policy, a separate frozen copy as the reference, winners and losers concatenated along the
batch (shared noise and timesteps), frozen text encoder, AdamW with gradient clipping. Training
reads cached latents in both implementations, so neither runs the VAE.

Runs on whatever device the models and inputs are on (CPU here; CUDA for GPU comparisons);
`dtype` other than float32 enables autocast on that device, as the official trainer's mixed
precision does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F


class TorchDPOStep:
    def __init__(self, unet: Any, text_encoder: Any, noise_scheduler: Any, beta: float = 5000.0,
                 learning_rate: float = 1e-5, grad_clip_norm: float = 1.0, dtype: torch.dtype = torch.float32):
        self.unet = unet.train()
        self.ref_unet = copy.deepcopy(unet).eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.scheduler = noise_scheduler
        self.beta = beta
        self.grad_clip_norm = grad_clip_norm
        self.dtype = dtype
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=learning_rate, weight_decay=1e-2)

    def __call__(self, latents_w: torch.Tensor, latents_l: torch.Tensor, input_ids: torch.Tensor,
                 generator: torch.Generator, added_cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One optimizer step; returns the loss as a 0-d tensor (no host sync forced here)."""
        device = latents_w.device
        bsz = latents_w.shape[0]
        latents = torch.cat([latents_w, latents_l])
        noise = torch.randn(latents_w.shape, generator=generator, device=device).repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,),
                                  generator=generator, device=device).repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            context = self.text_encoder(input_ids)[0].repeat(2, 1, 1)
        added = None if added_cond is None else {k: v.repeat(2, 1) for k, v in added_cond.items()}
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.unet(noisy, timesteps, context, added_cond_kwargs=added).sample
            with torch.no_grad():
                ref_pred = self.ref_unet(noisy, timesteps, context, added_cond_kwargs=added).sample
        model_losses = (pred.float() - noise).pow(2).mean(dim=[1, 2, 3])
        ref_losses = (ref_pred.float() - noise).pow(2).mean(dim=[1, 2, 3])
        model_w, model_l = model_losses.chunk(2)
        ref_w, ref_l = ref_losses.chunk(2)
        inside = -0.5 * self.beta * ((model_w - model_l) - (ref_w - ref_l))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
