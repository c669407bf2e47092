"""AGFSync on SDXL-base, candidates sampled as the authors' released code does: LCM-LoRA, 5 steps.

    agfsync-jax pipeline --config=configs/sdxl_lcm_lora.py --workdir=/data/agfsync-sdxl-lcm \
        --config.model.path=/models/stable-diffusion-xl-base-1.0 \
        --config.sampling.lora_path=/models/lcm-lora-sdxl/pytorch_lora_weights.safetensors \
        [prompt / scoring flags as in configs/sd15.py]

The authors' sampler (dpo_dataset/gen_img.py of their repository) loads latent-consistency/
lcm-lora-sdxl, switches the pipeline to `LCMScheduler.from_config(pipe.scheduler.config)` and
samples 5 steps at guidance 1.0 (no classifier-free guidance: one UNet call per step); that is
what `sampling.*` below sets. Everything else is configs/sdxl.py: the paper's hyperparameters
(1024 px, lr 1e-6, batch 64, N = 8, sigma = 0.1) and our defaults where the paper and their code
differ (design.md section 10). To reproduce their sampler's other choices as well, add
`--config.sampling.clean_first_candidate=True --config.sampling.shared_initial_latents=True`
(and `--config.sampling.pooled_noise_sigma=1.0` for their unit noise on the pooled embedding,
which we treat as a bug).

The LoRA changes only the candidates: DPO trains and exports the base UNet. The `eval` stage
samples with `config.sampling` too; for an evaluation with the standard sampler, run it with
`--config.sampling.scheduler='' --config.sampling.steps=50 --config.sampling.guidance_scale=7.5
--config.sampling.lora_path=''` (the folder's Euler scheduler).

Cost (counted, benchmarks/sampling_lcm.py; docs/performance.md): 44.4 TFLOP per 1024 px image
with VAE decode, vs 687 TFLOP for 50 DDIM steps at guidance 7.5, i.e. 16.3 vs 252 EFLOP for the
paper's 45.8K prompts x 8 candidates. Hardware: as configs/sdxl.py for training (SDXL DPO needs
`mesh.fsdp=8` on 80 GB devices); sampling holds SDXL in bfloat16 (about 7 GB of weights with the
text encoders) replicated per device, which is an estimate, not a measured fit.
"""

from configs import sdxl


def get_config():
    c = sdxl.get_config()
    c.sampling.scheduler = "lcm"  # LCMScheduler on the folder's betas, as `from_config` gives
    c.sampling.steps = 5  # the authors' code
    c.sampling.guidance_scale = 1.0  # the authors' code: no classifier-free guidance
    c.sampling.lora_path = ""  # required: the LCM-LoRA for SDXL (latent-consistency/lcm-lora-sdxl)
    c.sampling.lora_scale = 1.0  # `fuse_lora()`'s default
    return c
