"""The embedded tiny default: a random tiny SD1.x pipeline, built in code, end to end on CPU.

    agfsync-jax pipeline --config=configs/tiny.py --workdir=workdir/demo

Needs no network and no weights (`make demo` runs it). The model is random, so the images are
noise-like; the point is that every stage runs through the real code paths. Use
`--config.model.tiny=sdxl` for the tiny SDXL layout.
"""

from configs import common
from agfsync_jax.models.tiny import TINY_RESOLUTION


def get_config():
    c = common.base_config()
    c.model.tiny = "sd1"
    c.model.resolution = TINY_RESOLUTION

    c.prompts.per_category = 2
    c.prompts.min_questions = 5

    c.sampling.num_candidates = 4
    c.sampling.steps = 10
    c.sampling.batch_size = 8

    # Tiny random CLIP / BLIP-2 / aesthetic head, built under WORKDIR/scores/tiny_models.
    c.scoring.tiny = True

    c.train.batch_size = 8
    c.train.steps = 40
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 0
    c.train.log_every = 5
    c.train.checkpoint_every = 20

    c.eval.num_prompts = 24
    c.eval.grid_prompts = 4
    return c
