"""AGFSync on Stable Diffusion v1.4: the paper uses the SD1.5 recipe (512 px, lr 5e-7, batch 128).

    agfsync-jax pipeline --config=configs/sd14.py --workdir=/data/agfsync-sd14 \
        --config.model.path=/models/stable-diffusion-v1-4 [scoring/LLM flags as in configs/sd15.py]

Produces WORKDIR/export (diffusers SD1.4 folder, finetuned UNet) and WORKDIR/eval.
"""

from configs import sd15


def get_config():
    return sd15.get_config()
