"""The embedded tiny default: a tiny SD1.x pipeline, built in code, end to end on CPU.

    agfsync-jax pipeline --config=configs/tiny.py --workdir=workdir/demo

Sized for a 2-core CPU and no network or weights (`make demo` runs it; timings and results in
docs/tiny_closed_loop.md). The tiny UNet is first pretrained into a denoiser of synthetic latents
that differ in smoothness (agfsync_jax/tiny/pretrain.py); the VAE, text encoder and scorers stay
random, so the images are texture-like. A random UNet gives DPO nothing to learn; the pretrained
one does: the finetuned model should beat the base on the training reward over the held-out
eval prompts (sign test in the report). Use `--config.model.tiny=sdxl` for the tiny SDXL layout
and `--config.model.tiny_pretrain_steps=0` for a random UNet."""

from configs import common
from agfsync_jax.tiny.pipeline import TINY_RESOLUTION


def get_config():
    c = common.base_config()
    c.model.tiny = "sd1"
    c.model.resolution = TINY_RESOLUTION
    c.model.tiny_pretrain_steps = 300

    # 96 prompts: enough for the win rate's sign test to separate a real gain from chance.
    c.prompts.per_category = 8
    c.prompts.min_questions = 5

    c.sampling.num_candidates = 4
    # The tiny folder stores a PNDM config; the demo's measured results were sampled with DDIM
    # (the sample stage logs that this overrides the folder's class).
    c.sampling.scheduler = "ddim"
    c.sampling.steps = 10
    c.sampling.batch_size = 8

    # Tiny random CLIP / BLIP-2 / aesthetic head / HPS / VILA, built under WORKDIR/scores/tiny_models.
    c.scoring.tiny = True
    # The reward's aesthetic is the tiny LAION head (the demo's reward predates VILA; keep it).
    c.scoring.aesthetic = "laion"

    c.train.batch_size = 8
    c.train.steps = 40
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 0
    c.train.log_every = 5
    c.train.checkpoint_every = 20
    # Validation curve in TensorBoard (val/*): 16 pairs (two batches) held out, never trained on,
    # scored every 10 steps, and a grid of samples on two fixed prompts.
    c.train.val_pairs = 16
    c.train.eval_every = 10
    c.train.val_prompts = ("a red cat sitting on a wooden table", "a small house near the river")

    c.eval.num_prompts = 96
    # Scored in the eval only, not weighted: the tiny HPS v2 and VILA models, so the report has
    # their columns (the paper's Table 1 metrics).
    c.eval.extra_scorers = "hps,vila"
    c.eval.grid_prompts = 4
    return c
