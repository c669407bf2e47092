"""AGFSync on SDXL-base with the paper's hyperparameters (1024 px, lr 1e-6, batch 64).

    agfsync-jax pipeline --config=configs/sdxl.py --workdir=/data/agfsync-sdxl \
        --config.model.path=/models/stable-diffusion-xl-base-1.0 [scoring/LLM flags as in configs/sd15.py]

Produces WORKDIR/export (a diffusers SDXL folder with the finetuned UNet) and WORKDIR/eval.

Sized for a TPU v5p-8 (4 chips x 95 GB): parameters and Adam state sharded over every chip
(`mesh.fsdp=-1`), 64 pairs per step as 16 accumulated microbatches of one pair per chip,
bfloat16 compute, per-layer remat, prompts encoded once outside the step (no text encoders in
HBM during training). Check a slice before a run (compile only, no TPU needed):

    agfsync-jax plan --config=configs/sdxl.py --topology=v5p-8

The compiler's plan of the sampler fits (18.6 GiB per chip); the train step's plan was not
compiled on the development machine (docs/performance.md, "TPU pre-flight plan"). On another
slice keep chips x grad_accum_steps x pairs per chip = 64; on v5e chips (16 GB) also shard the
sampler's parameters (`--config.sampling.shard_params=fsdp`).
"""

from configs import sd15


def get_config():
    c = sd15.get_config()
    c.model.resolution = 1024
    c.plan.architecture = "sdxl"
    c.train.learning_rate = 1e-6  # paper, SDXL-base
    c.train.batch_size = 64  # paper
    c.train.grad_accum_steps = 16  # 4 chips x 16 x 1 pair = 64
    c.train.text_encoding = "cached"
    c.sampling.batch_size = 4  # one image per chip per call on 4 chips
    return c
