"""AGFSync on SDXL-base with the paper's hyperparameters (1024 px, lr 1e-6, batch 64).

    agfsync-jax pipeline --config=configs/sdxl.py --workdir=/data/agfsync-sdxl \
        --config.model.path=/models/stable-diffusion-xl-base-1.0 [scoring/LLM flags as in configs/sd15.py]

Produces WORKDIR/export (a diffusers SDXL folder with the finetuned UNet) and WORKDIR/eval.
SDXL's UNet needs FSDP beyond one 80 GB device at batch 64: `--config.mesh.fsdp=8`.
"""

from configs import sd15


def get_config():
    c = sd15.get_config()
    c.model.resolution = 1024
    c.plan.architecture = "sdxl"
    c.train.learning_rate = 1e-6  # paper, SDXL-base
    c.train.batch_size = 64  # paper
    c.mesh.fsdp = 8
    return c
