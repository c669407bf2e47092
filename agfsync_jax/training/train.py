"""The training loop: pairs in WORKDIR/pairs -> a finetuned UNet in WORKDIR/train.

    summary = train_and_evaluate(config, workdir)

WORKDIR/train/ holds `checkpoints/<step>/` (orbax), `tensorboard/` (event files),
`config.json` (the resolved config of the latest start), and `val_split.json` and `val_samples/`
when validating (training/validation.py); the `train` stage adds the done marker.
Re-running resumes from the latest checkpoint: parameters, optimizer state,
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
from typing import Any, Protocol

import jax
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from agfsync_jax import atomic_io, lora, sharding, storage, workdir as workdir_lib
from agfsync_jax.base_model import resolve_base_model_on_every_process
from agfsync_jax.models.denoiser import Conditioning, make_denoiser
from agfsync_jax.models.dtype_policy import DtypePolicy
from agfsync_jax.models.loading import FAMILY_SDXL, StableDiffusion, load_stable_diffusion
from agfsync_jax.models.text_encoding import sdxl_time_ids
from agfsync_jax.storage import Path, PathLike
from agfsync_jax.training import (
    checkpointing, losses, noise as noise_lib, pair_kinds, summaries, text as text_lib, validation, validation_split)
from agfsync_jax.training.train_state import (
    LR_SCHEDULES, OPTIMIZERS, TrainState, abstract_train_state, create_train_state, learning_rate_schedule,
    make_optimizer, train_state_shardings)
from agfsync_jax.training.train_step import (
    EMBEDS, INPUT_IDS, POOLED, TIME_IDS, Frozen, frozen_shardings, make_eval_step, make_train_step, slot_key)

CHECKPOINTS = checkpointing.CHECKPOINTS
TENSORBOARD = "tensorboard"
VAL_SAMPLES = "val_samples"
CONFIG_JSON = "config.json"
NONFINITE_MODES = ("skip", "stop")
TEXT_MODES = ("in_step", "cached")
# Console and TensorBoard show these first, in this order; other metrics follow.
_HEADLINE = ("loss", "implicit_acc", "policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l",
             "reward_margin", "learning_rate", "grad_norm")


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was not finite and `train.nonfinite` is "stop"."""


class PairSource(Protocol):
    """What the loop needs from the input pipeline (agfsync_jax.pairs.dataset.PairDataset)."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def state(self) -> dict[str, Any]: ...
    def restore(self, state: dict[str, Any]) -> None: ...


def open_pairs(config: Any, workdir: PathLike,
               split: validation_split.Split | None = None) -> PairSource:
    """This process's slice of WORKDIR/pairs (without the held-out pairs of `split`), batched:
    the loop's only tie to the data format."""
    from agfsync_jax.pairs.dataset import PairDataset

    return PairDataset(storage.as_path(workdir) / workdir_lib.PAIRS, global_batch_size=int(config.train.batch_size),
                       seed=int(config.train.shuffle_seed), records=None if split is None else split.train)


def step_inputs(raw: dict[str, np.ndarray], *, spec: losses.LossSpec, sd: StableDiffusion,
                text_mode: str, prompt_encoder: text_lib.PromptEncoder | None,
                resolution: int) -> dict[str, np.ndarray]:
    """A pair-dataset batch -> this process's part of the train step's batch (train_step keys)."""
    pair_kinds.check_batch(spec, raw)
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


def validate_config(config: Any, mesh: jax.sharding.Mesh) -> None:
    cfg = config.train
    if cfg.nonfinite not in NONFINITE_MODES:
        raise ValueError(f"train.nonfinite={cfg.nonfinite!r}, expected one of {NONFINITE_MODES}")
    if cfg.text_encoding not in TEXT_MODES:
        raise ValueError(f"train.text_encoding={cfg.text_encoding!r}, expected one of {TEXT_MODES}")
    if not 0.0 <= float(cfg.prompt_dropout) < 1.0:
        raise ValueError(f"train.prompt_dropout={cfg.prompt_dropout} must be in [0, 1)")
    if int(cfg.steps) < 1 or int(cfg.log_every) < 1:
        raise ValueError(f"train.steps={cfg.steps} and train.log_every={cfg.log_every} must be >= 1")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={cfg.optimizer!r}, expected one of {OPTIMIZERS}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={cfg.lr_schedule!r}, expected one of {LR_SCHEDULES}")
    if not 0.0 <= float(cfg.ema_decay) < 1.0:
        raise ValueError(f"train.ema_decay={cfg.ema_decay} must be in [0, 1) (0: no EMA)")
    if int(cfg.lora.rank) < 0 or float(cfg.lora.alpha) < 0:
        raise ValueError(f"train.lora.rank={cfg.lora.rank} and train.lora.alpha={cfg.lora.alpha} must be >= 0")
    if int(cfg.lora.rank) > 0:
        lora.parse_targets(cfg.lora.targets)
    per_micro = mesh.size * int(cfg.grad_accum_steps)
    if int(cfg.batch_size) % per_micro:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be a multiple of devices ({mesh.size}) x "
                         f"grad_accum_steps ({cfg.grad_accum_steps}) = {per_micro}")


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def lora_scale(train_config: Any) -> float | None:
    """alpha / rank of a LoRA run (alpha 0 means alpha = rank); None without LoRA."""
    rank = int(train_config.lora.rank)
    return lora.adapter_scale(rank, float(train_config.lora.alpha)) if rank > 0 else None


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
    base = None
    if int(config.train.lora.rank) > 0:
        # The one UNet copy: the adapters' base and, with adapters off, the reference.
        host = sd.unet.params
        base = sharding.place_tree(host, sharding.shardings_from_config(host, mesh, config.mesh))
    ref = (sharding.place_tree(sd.unet.params, param_shardings)
           if spec.uses_reference and base is None else None)
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
    return Frozen(ref_params=ref, text_params=text_params, empty=empty, base_params=base)


class _Reporter:
    """Console (absl), tqdm and TensorBoard output of process 0; silent elsewhere.

    TensorFlow writes the event files into a `storage.LocalMirror` of train/tensorboard: the
    directory itself when local; for gs:// a local one uploaded after every flush.
    """

    def __init__(self, train_dir: Path, total_steps: int, start_step: int):
        self.active = jax.process_index() == 0
        self.total = total_steps
        self._writer = None
        self._bar = None
        self._mirror = None
        if not self.active:
            return
        from tqdm import tqdm

        from agfsync_jax.tf_cpu import tensorflow_cpu_only

        tf = tensorflow_cpu_only()
        self._tf = tf
        # tf.summary.scalar needs the tensorboard package; summaries.py writes what it writes.
        self._scalar = summaries.scalar_metadata()
        self._samples_dir = train_dir / VAL_SAMPLES
        self._mirror = storage.LocalMirror(train_dir / TENSORBOARD)
        self._writer = tf.summary.create_file_writer(str(self._mirror.local))
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
        self._mirror.sync()
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

    def write_validation(self, step: int, result: validation.ValidationResult) -> None:
        """val/<metric> scalars and the val/samples image (also saved as a PNG file)."""
        if not self.active:
            return
        with self._writer.as_default(step=step):
            for key, value in result.scalars.items():
                self._tf.summary.write(f"val/{key}", self._tf.constant(value, self._tf.float32), metadata=self._scalar)
            if result.grid is not None:
                self._tf.summary.write("val/samples", summaries.image_tensor(self._tf, result.grid),
                                       metadata=summaries.image_metadata("train.val_prompts (rows) x seeds"))
        self._writer.flush()
        if result.grid is not None:
            atomic_io.atomic_write_bytes(self._samples_dir / f"step-{step:07d}.png", summaries.encode_png(result.grid))
        logging.info("step %d validation: %s", step, " ".join(f"{k}={v:.4g}" for k, v in result.scalars.items())
                     or "samples only")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
            self._mirror.close()


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    fetched = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def check_finite(metrics: dict[str, jax.Array], step: int, mode: str,
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
    initial_params: Any  # host tree the state starts from: the base UNet, or fresh LoRA adapters

    def initial_state(self, seed: int) -> TrainState:
        """A fresh state from the base UNet weights (or fresh adapters), placed on the mesh."""
        return create_train_state(self.initial_params, self.tx, seed, self.state_shardings)

    def inputs(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A pair-dataset batch -> this process's part of the step's batch (host arrays)."""
        return step_inputs(raw, spec=self.spec, sd=self.sd, text_mode=self.text_mode,
                           prompt_encoder=self.prompt_encoder, resolution=self.resolution)


def build_training(config: Any, sd: StableDiffusion, mesh: jax.sharding.Mesh) -> TrainSetup:
    """Loss, optimizer, shardings, frozen trees and the jitted steps for `config` on `mesh`."""
    validate_config(config, mesh)
    cfg = config.train
    spec = losses.get_loss(cfg.loss)
    schedule = noise_lib.schedule_from_config(sd.scheduler_config)
    tx = make_optimizer(cfg)
    initial = sd.unet.params
    if int(cfg.lora.rank) > 0:
        # Its own stream of the seed: the state's key (noise, timesteps) stays as without LoRA.
        initial = lora.init_adapters(sd.unet.params, sd.unet.config, int(cfg.lora.rank),
                                     lora.parse_targets(cfg.lora.targets),
                                     jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 1))
    abstract = abstract_train_state(initial, tx, int(config.seed), ema=float(cfg.ema_decay) > 0)
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
                             cfg.remat_scope, lora_scale=lora_scale(cfg), mesh=mesh)
    text_encode = text_lib.step_text_encoder(sd) if cfg.text_encoding == "in_step" else None
    train_step = make_train_step(
        denoiser=denoiser, spec=spec, schedule=schedule, beta=float(cfg.beta), tx=tx,
        lr_schedule=learning_rate_schedule(cfg), mesh=mesh, state_shardings=state_sh,
        frozen_sharding=frozen_sh, text_encode=text_encode, grad_accum_steps=int(cfg.grad_accum_steps),
        prompt_dropout=float(cfg.prompt_dropout), ema_decay=float(cfg.ema_decay))
    eval_step = make_eval_step(
        denoiser=denoiser, spec=spec, schedule=schedule, beta=float(cfg.beta), mesh=mesh,
        param_shardings=state_sh.params, frozen_sharding=frozen_sh, text_encode=text_encode)
    return TrainSetup(spec=spec, tx=tx, abstract_state=_with_shardings(abstract, state_sh),
                      state_shardings=state_sh, frozen=frozen, train_step=train_step, eval_step=eval_step,
                      prompt_encoder=prompt_encoder, sd=sd, text_mode=cfg.text_encoding,
                      resolution=int(config.model.resolution), initial_params=initial)


def train_and_evaluate(config: Any, workdir: PathLike) -> dict[str, Any]:
    """Trains to `config.train.steps`, resuming from WORKDIR/train if it holds checkpoints."""
    # diffusers' Flax classes warn on every instantiation; the pin in setup.py is deliberate.
    warnings.filterwarnings("ignore", message="Flax classes are deprecated")
    cfg = config.train
    train_dir = storage.as_path(workdir) / workdir_lib.TRAIN
    total_steps = int(cfg.steps)
    mesh = sharding.make_mesh(config.mesh)
    validate_config(config, mesh)  # before loading anything
    pairs_dir = storage.as_path(workdir) / workdir_lib.PAIRS
    pair_kinds.check_dataset(losses.get_loss(cfg.loss), pairs_dir)
    validation.check_config(cfg, validation_split.check_settings(cfg)
                            or (train_dir / validation_split.SPLIT_FILE).is_file())
    if cfg.loss == "released_code_dpo" and float(cfg.beta) != 1.0:
        logging.warning("train.loss=released_code_dpo with beta=%s; the authors' code uses beta=1", cfg.beta)
    base = resolve_base_model_on_every_process(config, workdir)
    # The VAE only decodes the validation grid.
    sd = load_stable_diffusion(base, DtypePolicy.from_config(config.model),
                               components=("unet", "text_encoders") + (("vae",) if cfg.val_prompts else ()),
                               variant=config.model.variant)
    setup = build_training(config, sd, mesh)

    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                      save_every=int(cfg.checkpoint_every), keep=int(cfg.keep_checkpoints))
    latest = ckpt.latest_step()
    split = validation_split.load_or_make_split(cfg, pairs_dir, train_dir, resuming=latest is not None)
    pairs = open_pairs(config, workdir, split)
    validator = validation.Validator.build(
        config, sd, mesh, pairs_dir=pairs_dir, split=split, eval_step=setup.eval_step, frozen=setup.frozen,
        inputs=setup.inputs, unet_shardings=setup.state_shardings.params)
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
            "process_count": jax.process_count(), "started_at_step": start_step,
            "held_out_pairs": 0 if split is None else len(split.held_out)})
        atomic_io.atomic_write_json(train_dir / CONFIG_JSON, resolved)
    if start_step >= total_steps:
        logging.info("checkpoint step %d already reaches train.steps=%d", start_step, total_steps)

    reporter = _Reporter(train_dir, total_steps, start_step)
    history: list[dict[str, jax.Array]] = []
    last: dict[str, float] = {}
    last_val: dict[str, float] = {}
    window: tuple[float, int] | None = None  # (time, step) of the previous report
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = sharding.place_batch(setup.inputs(next(pairs)), mesh)
            state, metrics = setup.train_step(state, setup.frozen, batch)
            # Checking means waiting for the step; with "skip" the count in the state suffices.
            check_finite(metrics, step, cfg.nonfinite, ckpt)
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
            if validator is not None and validator.due(step):
                result = validator(state.params)  # its own data and keys: the run trains as without it
                last_val = result.scalars
                reporter.write_validation(step, result)
            if ckpt.should_save(step) or step == total_steps:
                ckpt.save(step, state, pairs.state())
        ckpt.wait_until_finished()
    finally:
        reporter.close()
        ckpt.close()

    final_step = int(jax.device_get(state.step))
    summary = {"step": final_step, "checkpoint": str(ckpt.directory / str(final_step)),
               "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
               **{k: last[k] for k in ("loss", "implicit_acc") if k in last},
               **({"val": last_val} if last_val else {})}
    multihost_utils.sync_global_devices("agfsync:train_done")
    return summary
