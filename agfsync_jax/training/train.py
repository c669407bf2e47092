"""The training loop: pairs in WORKDIR/pairs -> a finetuned UNet in WORKDIR/train.

    summary = train_and_evaluate(config, workdir)

WORKDIR/train/ holds `checkpoints/<step>/` (orbax), `tensorboard/` (event files),
`config.json` (the resolved config of the latest start) and, once `train.steps` is reached,
the done marker. Re-running resumes from the latest checkpoint: parameters, optimizer state,
step, RNG key and the data position, so the run continues exactly as if never interrupted. A
checkpoint that cannot be restored stops the run with the reason; only an empty checkpoint
directory starts from the base weights.

Every process runs this same function; each reads its slice of the pairs and feeds its part of
every global batch. Only process 0 writes logs, TensorBoard and JSON files; all take part in
checkpointing (each writes its shards of the state).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from agfsync_jax import atomic_io, sharding, workdir as workdir_lib
from agfsync_jax.models.dtype_policy import DtypePolicy
from agfsync_jax.models.loading import FAMILY_SDXL, StableDiffusion, load_stable_diffusion
from agfsync_jax.models.text_encoding import sdxl_time_ids
from agfsync_jax.models.tiny import resolve_base_model_on_every_process
from agfsync_jax.schemas import PAIR_CROSS
from agfsync_jax.training import checkpointing, losses, noise as noise_lib, text as text_lib
from agfsync_jax.training.objective import Conditioning, make_denoiser
from agfsync_jax.training.train_state import (
    TrainState, abstract_train_state, create_train_state, learning_rate_schedule, make_optimizer,
    train_state_shardings)
from agfsync_jax.training.train_step import (
    EMBEDS, INPUT_IDS, POOLED, TIME_IDS, Frozen, frozen_shardings, make_eval_step, make_train_step, slot_key)

CHECKPOINTS = checkpointing.CHECKPOINTS
TENSORBOARD = "tensorboard"
CONFIG_JSON = "config.json"
NONFINITE_MODES = ("skip", "stop")
TEXT_MODES = ("in_step", "cached")
# Console and TensorBoard show these first, in this order; other metrics follow.
_HEADLINE = ("loss", "implicit_acc", "policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l",
             "reward_margin", "learning_rate", "grad_norm")


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was not finite and `train.nonfinite` is "stop"."""


class PairSource(Protocol):
    """What the loop needs from the input pipeline (agfsync_jax.pair_dataset.PairDataset)."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def state(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...


def open_pairs(config: Any, workdir: str | Path) -> PairSource:
    """This process's slice of WORKDIR/pairs, batched: the loop's only tie to the data format."""
    from agfsync_jax.pair_dataset import PairDataset

    return PairDataset(Path(workdir) / workdir_lib.PAIRS, global_batch_size=int(config.train.batch_size),
                       seed=int(config.train.shuffle_seed))


def step_inputs(raw: dict[str, np.ndarray], *, spec: losses.LossSpec, sd: StableDiffusion,
                text_mode: str, prompt_encoder: text_lib.PromptEncoder | None,
                resolution: int) -> dict[str, np.ndarray]:
    """A pair-dataset batch -> this process's part of the train step's batch (train_step keys)."""
    if spec.requires_pair_kind == PAIR_CROSS and not bool(np.all(raw["is_cross"])):
        ids = [str(p) for p, c in zip(raw["prompt_id"], raw["is_cross"]) if not c]
        raise ValueError(f"train.loss={spec.name!r} needs InstructEngine cross pairs; these pairs are "
                         f"not: {ids[:5]}{' ...' if len(ids) > 5 else ''}")
    batch = {losses.WINNER: raw["winner_latent"], losses.LOSER: raw["loser_latent"]}
    texts = (raw["prompt"], raw["prompt_2"])
    for slot in range(spec.num_prompts):
        prompts = [str(p) for p in texts[slot]]
        if text_mode == "in_step":
            batch[slot_key(INPUT_IDS, slot)] = text_lib.token_ids(sd, prompts)
        else:
            encoded = prompt_encoder(prompts)
            batch[slot_key(EMBEDS, slot)] = encoded.embeds
            if encoded.pooled is not None:
                batch[slot_key(POOLED, slot)] = encoded.pooled
    if sd.family == FAMILY_SDXL:
        batch[TIME_IDS] = sdxl_time_ids(resolution, len(raw["prompt"]))
    return batch


def _validate(config: Any, mesh: jax.sharding.Mesh) -> None:
    cfg = config.train
    if cfg.nonfinite not in NONFINITE_MODES:
        raise ValueError(f"train.nonfinite={cfg.nonfinite!r}, expected one of {NONFINITE_MODES}")
    if cfg.text_encoding not in TEXT_MODES:
        raise ValueError(f"train.text_encoding={cfg.text_encoding!r}, expected one of {TEXT_MODES}")
    if not 0.0 <= float(cfg.prompt_dropout) < 1.0:
        raise ValueError(f"train.prompt_dropout={cfg.prompt_dropout} must be in [0, 1)")
    if int(cfg.steps) < 1 or int(cfg.log_every) < 1:
        raise ValueError(f"train.steps={cfg.steps} and train.log_every={cfg.log_every} must be >= 1")
    per_micro = mesh.size * int(cfg.grad_accum_steps)
    if int(cfg.batch_size) % per_micro:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be a multiple of devices ({mesh.size}) x "
                         f"grad_accum_steps ({cfg.grad_accum_steps}) = {per_micro}")


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _abstract_encoding(sd: StableDiffusion) -> Any:
    """Shapes of one prompt's encoding, in the compute dtype the PromptEncoder keeps."""
    length = sd.tokenizers[0].model_max_length
    ids = jax.ShapeDtypeStruct((len(sd.text_encoders), 1, length), np.int32)
    params = tuple(c.params for c in sd.text_encoders)
    encoded = jax.eval_shape(text_lib.step_text_encoder(sd), params, ids)
    dtype = sd.unet.module.dtype
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), encoded)


def _frozen(config: Any, spec: losses.LossSpec, sd: StableDiffusion, param_shardings: Any,
            mesh: jax.sharding.Mesh, prompt_encoder: text_lib.PromptEncoder | None) -> Frozen:
    ref = sharding.place_tree(sd.unet.params, param_shardings) if spec.uses_reference else None
    text_params = None
    if config.train.text_encoding == "in_step":
        host = tuple(c.params for c in sd.text_encoders)
        text_params = sharding.place_tree(host, sharding.shardings_from_config(host, mesh, config.mesh))
    empty = None
    if float(config.train.prompt_dropout) > 0:
        # The encoding of "" (not zeros, even for SDXL): what diffusers' training scripts drop to.
        if prompt_encoder is None:  # an abstract model (compile-only plans): its shapes suffice
            encoded = _abstract_encoding(sd)
        else:
            encoded = prompt_encoder([""])
        host = Conditioning(encoded.embeds, encoded.pooled)
        empty = sharding.place_tree(host, jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), host))
    return Frozen(ref_params=ref, text_params=text_params, empty=empty)


class _Reporter:
    """Console (absl), tqdm and TensorBoard output of process 0; silent elsewhere."""

    def __init__(self, train_dir: Path, total_steps: int, start_step: int):
        self.active = jax.process_index() == 0
        self.total = total_steps
        self._writer = None
        self._bar = None
        if not self.active:
            return
        from tqdm import tqdm

        from agfsync_jax.pair_dataset import tensorflow_cpu_only

        tf = tensorflow_cpu_only()
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        # tf.summary.scalar needs the tensorboard package; a summary tagged for the scalars plugin
        # is what it writes, and TensorBoard reads it the same way.
        self._scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        self._writer = tf.summary.create_file_writer(str(train_dir / TENSORBOARD))
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def write(self, step: int, metrics: dict[str, float], steps_per_sec: float | None) -> None:
        if not self.active:
            return
        keys = [k for k in _HEADLINE if k in metrics] + sorted(set(metrics) - set(_HEADLINE))
        scalars = {f"train/{k}": metrics[k] for k in keys}
        if steps_per_sec is not None:
            scalars["train/steps_per_sec"] = steps_per_sec
        with self._writer.as_default(step=step):
            for tag, value in scalars.items():
                self._tf.summary.write(tag, self._tf.constant(value, self._tf.float32), metadata=self._scalar)
        self._writer.flush()
        speed = ""
        if steps_per_sec:
            eta = round((self.total - step) / steps_per_sec)
            speed = f" | {steps_per_sec:.2f} steps/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys)
        logging.info("step %d/%d %s%s", step, self.total, shown, speed)
        postfix = {"loss": f"{metrics['loss']:.4f}"}
        if "implicit_acc" in metrics:  # losses without a preference (sft) have none
            postfix["acc"] = f"{metrics['implicit_acc']:.3f}"
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    fetched = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _check_finite(metrics: dict[str, jax.Array], step: int, mode: str,
                  ckpt: checkpointing.Checkpointer) -> None:
    if mode == "stop" and int(jax.device_get(metrics["nonfinite"])):
        raise NonFiniteError(
            f"step {step}: the loss or gradient is not finite (train.nonfinite='stop'); the update was "
            f"not applied and nothing was saved after it. Latest checkpoint: {ckpt.latest_step()}")


@dataclasses.dataclass
class TrainSetup:
    """Everything the loop derives from (config, model, mesh) before the first step."""

    spec: losses.LossSpec
    tx: optax.GradientTransformation
    abstract_state: TrainState  # shapes, dtypes and shardings of the state
    state_shardings: TrainState
    frozen: Frozen
    train_step: Callable[[TrainState, Frozen, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[Any, Frozen, dict[str, jax.Array], jax.Array], dict[str, jax.Array]]
    prompt_encoder: text_lib.PromptEncoder | None
    sd: StableDiffusion
    text_mode: str
    resolution: int

    def initial_state(self, seed: int) -> TrainState:
        """A fresh state from the base UNet weights, placed on the mesh."""
        return create_train_state(self.sd.unet.params, self.tx, seed, self.state_shardings)

    def inputs(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A pair-dataset batch -> this process's part of the step's batch (host arrays)."""
        return step_inputs(raw, spec=self.spec, sd=self.sd, text_mode=self.text_mode,
                           prompt_encoder=self.prompt_encoder, resolution=self.resolution)


def build_training(config: Any, sd: StableDiffusion, mesh: jax.sharding.Mesh) -> TrainSetup:
    """Loss, optimizer, shardings, frozen trees and the jitted steps for `config` on `mesh`."""
    _validate(config, mesh)
    cfg = config.train
    spec = losses.get_loss(cfg.loss)
    schedule = noise_lib.schedule_from_config(sd.scheduler_config)
    tx = make_optimizer(cfg)
    abstract = abstract_train_state(sd.unet.params, tx, int(config.seed))
    state_sh = train_state_shardings(abstract, mesh, config.mesh)
    prompt_encoder = None
    # An abstract model (ShapeDtypeStruct parameters) builds the same steps for compile-only
    # plans; it has no weights to encode prompts with.
    needs_encoder = cfg.text_encoding == "cached" or float(cfg.prompt_dropout) > 0
    if needs_encoder and not sharding.is_abstract(sd.unet.params):
        compute_dtype = DtypePolicy.from_config(config.model).compute_dtype
        prompt_encoder = text_lib.PromptEncoder(sd, np.dtype(compute_dtype))
    frozen = _frozen(config, spec, sd, state_sh.params, mesh, prompt_encoder)
    frozen_sh = frozen_shardings(frozen, state_sh.params, mesh, config.mesh)
    denoiser = make_denoiser(sd.unet.module, cfg.remat_policy if cfg.remat else "", cfg.attention,
                             cfg.remat_scope, mesh=mesh)
    text_encode = text_lib.step_text_encoder(sd) if cfg.text_encoding == "in_step" else None
    train_step = make_train_step(
        denoiser=denoiser, spec=spec, schedule=schedule, beta=float(cfg.beta), tx=tx,
        lr_schedule=learning_rate_schedule(cfg), mesh=mesh, state_shardings=state_sh,
        frozen_sharding=frozen_sh, text_encode=text_encode, grad_accum_steps=int(cfg.grad_accum_steps),
        prompt_dropout=float(cfg.prompt_dropout))
    eval_step = make_eval_step(
        denoiser=denoiser, spec=spec, schedule=schedule, beta=float(cfg.beta), mesh=mesh,
        param_shardings=state_sh.params, frozen_sharding=frozen_sh, text_encode=text_encode)
    return TrainSetup(spec=spec, tx=tx, abstract_state=_with_shardings(abstract, state_sh),
                      state_shardings=state_sh, frozen=frozen, train_step=train_step, eval_step=eval_step,
                      prompt_encoder=prompt_encoder, sd=sd, text_mode=cfg.text_encoding,
                      resolution=int(config.model.resolution))


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Trains to `config.train.steps`, resuming from WORKDIR/train if it holds checkpoints."""
    # diffusers' Flax classes warn on every instantiation; the pin in setup.py is deliberate.
    warnings.filterwarnings("ignore", message="Flax classes are deprecated")
    cfg = config.train
    train_dir = Path(workdir) / workdir_lib.TRAIN
    total_steps = int(cfg.steps)
    mesh = sharding.make_mesh(config.mesh)
    _validate(config, mesh)  # before loading anything
    if cfg.loss == "released_code_dpo" and float(cfg.beta) != 1.0:
        logging.warning("train.loss=released_code_dpo with beta=%s; the authors' code uses beta=1", cfg.beta)
    base = resolve_base_model_on_every_process(config, workdir)
    sd = load_stable_diffusion(base, DtypePolicy.from_config(config.model),
                               components=("unet", "text_encoders"))
    setup = build_training(config, sd, mesh)

    pairs = open_pairs(config, workdir)
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                      save_every=int(cfg.checkpoint_every), keep=int(cfg.keep_checkpoints))
    latest = ckpt.latest_step()
    if latest is None:
        logging.info("no checkpoint in %s: starting from the base weights of %s", ckpt.directory, base)
        state = setup.initial_state(int(config.seed))
    else:
        state, position = ckpt.restore(latest, setup.abstract_state)
        pairs.restore(position)
        logging.info("restored step %d from %s (data position %s)", latest, ckpt.directory, position)
    start_step = int(jax.device_get(state.step))
    if jax.process_index() == 0:
        resolved = dict(config.to_dict(), _resolved={
            "base_model": str(base), "family": sd.family, "mesh": dict(mesh.shape),
            "process_count": jax.process_count(), "started_at_step": start_step})
        atomic_io.atomic_write_json(train_dir / CONFIG_JSON, resolved)
    if start_step >= total_steps:
        logging.info("checkpoint step %d already reaches train.steps=%d", start_step, total_steps)

    reporter = _Reporter(train_dir, total_steps, start_step)
    history: list[dict[str, jax.Array]] = []
    last: dict[str, float] = {}
    window: tuple[float, int] | None = None  # (time, step) of the previous report
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = sharding.place_batch(setup.inputs(next(pairs)), mesh)
            state, metrics = setup.train_step(state, setup.frozen, batch)
            # Checking means waiting for the step; with "skip" the count in the state suffices.
            _check_finite(metrics, step, cfg.nonfinite, ckpt)
            history.append(metrics)
            reporter.advance()
            if step % int(cfg.log_every) == 0 or step == total_steps:
                last = _mean_metrics(history)
                last["nonfinite_steps"] = float(jax.device_get(state.nonfinite_steps))
                history = []
                now = time.perf_counter()
                # Speed is measured between reports, so the first (which compiles) has none.
                rate = (step - window[1]) / (now - window[0]) if window is not None else None
                window = (now, step)
                reporter.write(step, last, rate)
            if ckpt.should_save(step) or step == total_steps:
                ckpt.save(step, state, pairs.state())
        ckpt.wait_until_finished()
    finally:
        reporter.close()
        ckpt.close()

    final_step = int(jax.device_get(state.step))
    summary = {"step": final_step, "checkpoint": str(ckpt.directory / str(final_step)),
               "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
               **{k: last[k] for k in ("loss", "implicit_acc") if k in last}}
    multihost_utils.sync_global_devices("agfsync:train_done")
    if jax.process_index() == 0:
        atomic_io.atomic_write_json(train_dir / workdir_lib.DONE_MARKER, summary)
    return summary
