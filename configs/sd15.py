"""AGFSync on Stable Diffusion v1.5 with the paper's hyperparameters (512 px, lr 5e-7, batch 128).

    agfsync-jax pipeline --config=configs/sd15.py --workdir=/data/agfsync-sd15 \
        --config.model.path=/models/stable-diffusion-v1-5 \
        --config.prompts.source=llm --config.prompts.llm.model=gpt-4o-mini \
        --config.scoring.vqa_path=/models/blip2-flan-t5-xxl \
        --config.scoring.clip_path=/models/clip-vit-base-patch16 \
        --config.scoring.aesthetic_clip_path=/models/clip-vit-large-patch14 \
        --config.scoring.aesthetic_head_path=/models/sac+logos+ava1-l14-linearMSE.pth

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
    c = common.base_config()
    c.model.path = ""  # required: a local diffusers SD1.5 folder
    c.plan.architecture = "sd15"  # `agfsync-jax plan` without model.path: SD1.5's shipped configs
    c.model.resolution = 512
    c.model.compute_dtype = "bfloat16"

    c.mesh.fsdp = -1  # every chip holds 1/n of the parameters and optimizer state

    c.sampling.num_candidates = 8  # paper: N = 8
    c.sampling.noise_sigma = 0.1  # paper: sigma = 0.1
    c.sampling.steps = 50
    c.sampling.guidance_scale = 7.5
    c.sampling.batch_size = 8  # one image per chip per call on 8 chips

    c.train.loss = "dpo"
    c.train.beta = 5000.0  # Diffusion-DPO default for SD1.5
    c.train.learning_rate = 5e-7  # paper, SD v1.4/v1.5
    c.train.batch_size = 128  # paper
    c.train.grad_accum_steps = 16  # 8 chips x 16 x 1 pair = 128
    c.train.steps = 1000  # paper
    c.train.warmup_steps = 0
    c.train.remat = True
    return c
