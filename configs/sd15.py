"""AGFSync on Stable Diffusion v1.5 with the paper's hyperparameters (512 px, lr 5e-7, batch 128).

    agfsync-jax pipeline --config=configs/sd15.py --workdir=/data/agfsync-sd15 \
        --config.model.path=/models/stable-diffusion-v1-5 \
        --config.prompts.source=llm --config.prompts.llm.model=gpt-4o-mini \
        --config.scoring.vqa_path=/models/blip2-flan-t5-xxl \
        --config.scoring.clip_path=/models/clip-vit-base-patch16 \
        --config.scoring.aesthetic_clip_path=/models/clip-vit-large-patch14 \
        --config.scoring.aesthetic_head_path=/models/sac+logos+ava1-l14-linearMSE.pth

Produces WORKDIR/export (a diffusers SD1.5 folder with the finetuned UNet) and WORKDIR/eval
(win rates against the base model). 1000 DPO steps at batch 128 on an 8-device mesh.
"""

from configs import common


def get_config():
    c = common.base_config()
    c.model.path = ""  # required: a local diffusers SD1.5 folder
    c.plan.architecture = "sd15"  # `agfsync-jax plan` without model.path: SD1.5's shipped configs
    c.model.resolution = 512
    c.model.compute_dtype = "bfloat16"

    c.sampling.num_candidates = 8  # paper: N = 8
    c.sampling.noise_sigma = 0.1  # paper: sigma = 0.1
    c.sampling.steps = 50
    c.sampling.guidance_scale = 7.5

    c.train.loss = "dpo"
    c.train.beta = 5000.0  # Diffusion-DPO default for SD1.5
    c.train.learning_rate = 5e-7  # paper, SD v1.4/v1.5
    c.train.batch_size = 128  # paper
    c.train.steps = 1000  # paper
    c.train.warmup_steps = 0
    c.train.remat = True
    return c
