"""Validation while training: the loss on held-out pairs and a grid of samples, every
`train.eval_every` steps (and at the last step).

    validator = Validator.build(config, sd, mesh, eval_step=..., frozen=..., inputs=..., ...)
    if validator.due(step):
        result = validator(state.params)     # ValidationResult: scalars + the sample grid

The held-out pairs (validation_split.py) are read once, in a fixed order, into fixed batches of
`train.val_batch_size`; batch j is always scored with the same noise and timesteps (keys folded
from `train.val_seed`), so the validation loss of one step is comparable with that of any other:
only the parameters change. For the DPO losses the metrics are the training loss's (loss,
implicit accuracy, reward margin, errors); for sft the denoising loss. Validation reads its own
data and keys and never the train state's key or the training iterator, so a run with
validation trains exactly as one without (and resumes exactly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from agfsync_jax import sharding, storage
from agfsync_jax.errors import ConfigError
from agfsync_jax.models.loading import StableDiffusion
from agfsync_jax.pairs.dataset import PairDataset
from agfsync_jax.training.summaries import tile
from agfsync_jax.training.validation_samples import SampleGrid
from agfsync_jax.training.validation_split import Split


def check_config(train_cfg: Any, has_split: bool) -> bool:
    """Whether validation runs; settings that cannot work raise naming the field."""
    every = int(train_cfg.eval_every)
    prompts = tuple(train_cfg.val_prompts)
    if every < 0:
        raise ConfigError(f"train.eval_every={every} must be >= 0 (0: no validation)")
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"train.val_prompts={prompts!r} must be non-empty strings")
    if every == 0:
        if prompts:
            raise ConfigError("train.val_prompts is set but train.eval_every=0: set how often to sample them")
        return False
    if not has_split and not prompts:
        raise ConfigError(f"train.eval_every={every} but nothing to validate on: set train.val_fraction or "
                         "train.val_pairs (held-out pairs) and/or train.val_prompts (a sample grid)")
    return True


def val_batch_size(train_cfg: Any) -> int:
    """`train.val_batch_size`, or the microbatch size of a training step when 0."""
    size = int(train_cfg.val_batch_size)
    return size if size > 0 else int(train_cfg.batch_size) // int(train_cfg.grad_accum_steps)


@dataclasses.dataclass
class ValidationResult:
    scalars: dict[str, float]  # metric name -> mean over the held-out batches (+ counts)
    grid: np.ndarray | None  # (H, W, 3) uint8: rows are prompts, columns seeds; None without prompts


class Validator:
    def __init__(self, every: int, total_steps: int, batches: list[dict[str, np.ndarray]], keys: list[jax.Array],
                 eval_step: Callable[..., dict[str, jax.Array]], frozen: Any, mesh: Mesh,
                 num_pairs: int, grid: SampleGrid | None):
        self.every = every
        self.total_steps = total_steps
        self._batches = batches
        self._keys = keys
        self._eval_step = eval_step
        self._frozen = frozen
        self._mesh = mesh
        self.num_pairs = num_pairs
        self._grid = grid

    @classmethod
    def build(cls, config: Any, sd: StableDiffusion, mesh: Mesh, *, pairs_dir: storage.Path, split: Split | None,
              eval_step: Callable[..., dict[str, jax.Array]], frozen: Any,
              inputs: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], unet_shardings: Any,
              ) -> "Validator | None":
        cfg = config.train
        if not check_config(cfg, split is not None):
            return None
        batches: list[dict[str, np.ndarray]] = []
        used = 0
        if split is not None:
            size = val_batch_size(cfg)
            if size % mesh.size:
                raise ConfigError(f"the validation batch ({size}: train.val_batch_size, or train.batch_size / "
                                 f"train.grad_accum_steps) must be a multiple of the device count {mesh.size}")
            if len(split.held_out) < size:
                raise ConfigError(f"{len(split.held_out)} held-out pairs do not fill one validation batch of {size}; "
                                 "hold out more (train.val_fraction / train.val_pairs) or set train.val_batch_size")
            held = PairDataset(pairs_dir, global_batch_size=size, seed=0, records=split.held_out)
            batches = [inputs(raw) for raw in held.fixed_batches()]
            used = len(batches) * size
            if used < len(split.held_out):
                logging.info("validation: %d of %d held-out pairs in %d batches of %d (the rest do not fill a batch)",
                             used, len(split.held_out), len(batches), size)
        base = jax.random.PRNGKey(int(cfg.val_seed))
        keys = [jax.random.fold_in(base, j) for j in range(len(batches))]
        grid = None
        if cfg.val_prompts:
            grid = SampleGrid(
                sd, tuple(cfg.val_prompts), images_per_prompt=int(cfg.val_images_per_prompt), seed=int(cfg.val_seed),
                steps=int(cfg.val_sample_steps), scheduler=config.sampling.scheduler,
                guidance_scale=float(config.sampling.guidance_scale), resolution=int(config.model.resolution),
                mesh=mesh, unet_shardings=unet_shardings,
                vae_shardings=sharding.shardings_from_config(sd.vae.params, mesh, config.mesh),
                eta=float(config.sampling.eta))
            if config.sampling.lora_path:
                logging.warning("validation: the sample grid samples the policy being trained without "
                                "sampling.lora_path (%s), which only the sample stage merges", config.sampling.lora_path)
        return cls(int(cfg.eval_every), int(cfg.steps), batches, keys, eval_step, frozen, mesh, used, grid)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def __call__(self, params: Any) -> ValidationResult:
        """Scores the held-out batches and samples the grid with `params`; reads nothing else."""
        scalars: dict[str, float] = {}
        if self._batches:
            metrics = [self._eval_step(params, self._frozen, sharding.place_batch(batch, self._mesh), key)
                       for batch, key in zip(self._batches, self._keys)]
            fetched = jax.device_get(metrics)
            # Every batch has the same size, so the mean of batch means is the mean over pairs.
            scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            scalars["pairs"] = float(self.num_pairs)
        grid = None
        if self._grid is not None:
            grid = tile(self._grid(params), columns=self._grid.columns)
        return ValidationResult(scalars, grid)
