"""AGFSync on Stable Diffusion v1.5 with the paper's hyperparameters (512 px, lr 5e-7, batch 128).

    agfsync-jax pipeline --config=configs/sd15.py --workdir=/data/agfsync-sd15 \
        --config.model.path=/models/stable-diffusion-v1-5 \
        --config.prompts.source=llm --config.prompts.llm.model=gpt-4o-mini \
        --config.scoring.vqa_path=/models/blip2-flan-t5-xxl \
        --config.scoring.clip_path=/models/clip-vit-base-patch16 \
        --config.scoring.vila_path=/models/vila

Produces WORKDIR/export (a diffusers SD1.5 folder with the finetuned UNet) and WORKDIR/eval
(win rates against the base model). 1000 DPO steps at batch 128 on an 8-device mesh.
"""

from configs import common


def get_config():
    c = common.base_config()  # the paper's SD1.x settings: N = 8, sigma = 0.1, lr 5e-7, batch 128
    c.model.path = ""  # required: a local diffusers SD1.5 folder
    c.model.compute_dtype = "bfloat16"
    c.train.remat = True
    return c
