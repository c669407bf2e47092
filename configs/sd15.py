"""AGFSync on Stable Diffusion v1.5 with the paper's hyperparameters (512 px, lr 5e-7, batch 128).

    agfsync-jax pipeline --config=configs/sd15.py --workdir=/data/agfsync-sd15 \
        --config.model.path=/models/stable-diffusion-v1-5 \
        --config.prompts.source=llm --config.prompts.llm.model=gpt-4o-mini \
        --config.scoring.vqa_path=/models/blip2-flan-t5-xxl \
        --config.scoring.clip_path=/models/clip-vit-base-patch16 \
        --config.scoring.vila_path=/models/vila

Produces WORKDIR/export (a diffusers SD1.5 folder with the finetuned UNet) and WORKDIR/eval
(win rates against the base model). 1000 DPO steps at batch 128.

Sized for a TPU v5e-8 (8 chips x 16 GB): parameters and Adam state sharded over every chip
(`mesh.fsdp=-1`), 128 pairs per step as 16 accumulated microbatches of one pair per chip,
bfloat16 compute, per-layer remat. Check a slice before a run (compile only, no TPU needed):

    agfsync-jax plan --config=configs/sd15.py --topology=v5e-8

The compiler's plan of the sampler fits (6.4 GiB per chip); the train step's plan did not
complete on the development machine (docs/performance.md, "TPU pre-flight plan"). On another
slice keep chips x grad_accum_steps x pairs per chip = 128 (e.g. v5p-8, 4 chips:
`--config.train.grad_accum_steps=8` for two pairs per chip).
"""

from configs import common


def get_config():
    c = common.base_config()  # the paper's SD1.x settings: N = 8, sigma = 0.1, lr 5e-7, batch 128
    c.model.path = ""  # required: a local diffusers SD1.5 folder
    c.plan.architecture = "sd15"  # `agfsync-jax plan` without model.path: SD1.5's shipped configs
    c.model.compute_dtype = "bfloat16"
    c.mesh.fsdp = -1  # every chip holds 1/n of the parameters and optimizer state
    c.sampling.batch_size = 8  # one image per chip per call on 8 chips
    c.train.grad_accum_steps = 16  # 8 chips x 16 x 1 pair = the paper's 128
    c.train.remat = True
    return c
