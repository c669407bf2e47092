"""AGFSync on SDXL-base with LoRA Diffusion-DPO: rank-8 adapters on the attention projections,
trained against the frozen base UNet (stored in bf16), which is also the reference.

    agfsync-jax pipeline --config=configs/sdxl_lora.py --workdir=/data/agfsync-sdxl-lora \
        --config.model.path=/models/stable-diffusion-xl-base-1.0 [scoring/LLM flags as in configs/sd15.py]

Produces WORKDIR/export/lora/pytorch_lora_weights.safetensors (for
`StableDiffusionXLPipeline.from_pretrained(base).load_lora_weights(WORKDIR/export/lora)`),
WORKDIR/export/pipeline (the base with the adapters merged) and WORKDIR/eval.

Everything but training is configs/sdxl.py (the paper's SDXL settings: 1024 px, N = 8, sigma
0.1, batch 64 pairs, 1000 steps, beta 5000). Training follows diffusers' LoRA Diffusion-DPO
SDXL example (examples/research_projects/diffusion_dpo): rank 8, alpha = rank, attention
projections, constant lr 1e-5 (the paper's 1e-6 is for full finetuning), with per-layer remat
and bf16 compute. The 64 pairs of a step are 8 accumulated microbatches, so each device holds
64 / (devices x 8) pairs at a time (8 on one device, 1 on eight).

Hardware (planned, not measured on an accelerator). The state is the bf16 base UNet (4.8 GiB),
float32 adapters and their Adam moments (rank 8: 0.13 GiB), with no reference copy; full SDXL
DPO keeps 16 bytes per parameter (38 GiB) before activations. The compile-only plan of this
step at one pair per device (XLA:CPU with its memory-minimising scheduler, docs/performance.md,
LoRA section) is 37.6 GiB: 4.9 GiB of arguments and 32.7 GiB of temporaries (activations). So:
8 devices of 48-80 GB (one pair each, as configured), or one 80 GB GPU with
`--config.train.grad_accum_steps=64`. By that plan it does not fit a 16 GiB chip at 1024 px
(FSDP shards the 4.9 GiB, not the activations); the TPU compiler's plan was not made.
"""

from configs import sdxl


def get_config():
    c = sdxl.get_config()
    c.model.param_dtype = "bfloat16"  # frozen base storage; adapters and optimizer state are float32
    c.model.compute_dtype = "bfloat16"
    c.mesh.fsdp = 1  # the bf16 base fits one device; FSDP rules still apply with mesh.fsdp > 1
    c.train.lora.rank = 8
    c.train.lora.alpha = 8.0
    c.train.lora.targets = "attention"
    c.train.learning_rate = 1e-5
    c.train.lr_schedule = "constant"
    c.train.batch_size = 64  # paper
    c.train.grad_accum_steps = 8
    c.train.remat = True
    c.train.remat_scope = "layers"
    return c
