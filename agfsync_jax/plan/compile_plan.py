"""Compile a run's real programs for TPU devices (never run them) and read the compiler's books.

    sd = abstract_model(config, folder)                       # shapes only, no weights
    mesh = sharding.make_mesh(config.mesh, devices=tpu_devices)
    train = plan_train_step(config, sd, mesh, hbm_bytes)     # -> ProgramPlan
    sample = plan_sampler(config, sd, mesh, hbm_bytes)

The programs are the ones `agfsync-jax train` and `agfsync-jax sample` build: the train step from
`training.train.build_training` (optimizer, FSDP shardings, frozen reference tree, gradient
accumulation, remat and attention choices) and the sampler from `sampling.program.SamplingProgram`
(text encoders, the denoising loop with classifier-free guidance, the VAE decoder when PNGs are
written), both over the run's mesh, with abstract parameters (`jax.ShapeDtypeStruct`s carrying
`NamedSharding`s over the TPU devices). Lowering and compiling happen in this process with the
real TPU compiler; nothing is allocated on any device.

What is read back, per device: XLA's memory analysis (arguments, outputs, the donated part of
the arguments reused as outputs, temporaries, generated code) and its cost analysis (FLOPs of one
execution of the per-device program). A program that needs more HBM than the chip has is
refused by the compiler itself; that refusal is recorded as the plan's `error`.

XLA's cost analysis counts a while loop's body once, so for programs with loops (the sampler's
denoising steps and per-device chunks, gradient accumulation) it undercounts. FLOPs per step,
pair and image therefore come from `flop_count` over the traced program, which multiplies every
loop by its trip count; the compiler's figure is kept next to it (`compiler_flops_per_device`).
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from agfsync_jax import sharding
from agfsync_jax.errors import ConfigError
from agfsync_jax.models.denoiser import Conditioning
from agfsync_jax.models.dtype_policy import DtypePolicy
from agfsync_jax.models.loading import FAMILY_SDXL, StableDiffusion, abstract_stable_diffusion
from agfsync_jax.models.text_encoding import encode_tokens
from agfsync_jax.plan import flop_count
from agfsync_jax.sampling import candidates
from agfsync_jax.sampling.program import SamplingProgram
from agfsync_jax.sampling.schedulers import make_scheduler, resolve_name
from agfsync_jax.training import losses
from agfsync_jax.training.train import build_training
from agfsync_jax.training.train_step import EMBEDS, INPUT_IDS, POOLED, TIME_IDS, slot_key

# Diffusers-format folders holding only the JSON configs of the full-size architectures
# (`plan.architecture`), for plans without a local copy of the weights.
ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"
ARCHITECTURES = ("sd15", "sdxl")
TRAIN = "train"
SAMPLE = "sample"
PROGRAMS = (TRAIN, SAMPLE)

_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory")


def architecture_folder(name: str) -> Path:
    if name not in ARCHITECTURES:
        raise ValueError(f"plan.architecture={name!r}; expected one of {ARCHITECTURES} (or set model.path)")
    return ARCHITECTURES_DIR / name


def model_folder(config: Any, scratch: Path) -> Path:
    """The folder whose configs define the planned model.

    `model.path` when set (its weights are not read), else the shipped architecture named by
    `plan.architecture`, else the tiny model of `model.tiny`, built into `scratch`.
    """
    if config.model.path:
        return Path(config.model.path)
    if config.plan.architecture:
        return architecture_folder(config.plan.architecture)
    if config.model.tiny:
        from agfsync_jax.tiny.build import save_tiny_pipeline

        folder = scratch / "tiny_model"
        if not folder.exists():
            save_tiny_pipeline(config.model.tiny, folder, seed=int(config.seed))
        return folder
    raise ConfigError("nothing to plan: set model.path (a diffusers folder; only its configs are read), "
                     f"plan.architecture (one of {ARCHITECTURES}) or model.tiny")


def abstract_model(config: Any, folder: Path) -> StableDiffusion:
    """The run's model (UNet, VAE, text encoders) with ShapeDtypeStruct parameters."""
    warnings.filterwarnings("ignore", message="Flax classes are deprecated")
    return abstract_stable_diffusion(folder, DtypePolicy.from_config(config.model))


@dataclasses.dataclass
class ProgramPlan:
    """The compiler's account of one program on one device of the mesh."""

    program: str  # "train" (one optimizer step) or "sample" (one sampling call)
    num_devices: int
    mesh: dict[str, int]
    items_per_call: int  # pairs per optimizer step, or images per sampling call
    item: str  # "pair" or "image"
    per_device: str  # the per-device work of one call, in words
    hbm_bytes: int  # what one device is planned against
    memory: dict[str, int] | None  # bytes per device; None when the compiler refused
    flops_per_call: float  # matmul + conv FLOPs of one call, all devices, loops by trip count
    flop_breakdown: dict[str, float]  # dot / conv / pallas parts of flops_per_call
    compiler_flops_per_device: float | None  # XLA's cost analysis (loop bodies counted once)
    compile_seconds: float
    error: str | None = None  # the compiler's refusal (first line), e.g. out of HBM

    @property
    def peak_bytes(self) -> int | None:
        return None if self.memory is None else self.memory["peak"]

    @property
    def fits(self) -> bool:
        return self.error is None and self.memory is not None and self.memory["peak"] <= self.hbm_bytes

    @property
    def flops_per_device(self) -> float:
        """SPMD: every device runs the same program on its shard of the batch."""
        return self.flops_per_call / self.num_devices

    @property
    def flops_per_item(self) -> float:
        return self.flops_per_call / self.items_per_call

    def seconds_per_call(self, peak_flops_per_device: float, mfu: float) -> float:
        """Wall time of one call *assuming* the devices run at `mfu` of their peak FLOP/s."""
        return self.flops_per_device / (peak_flops_per_device * mfu)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(fits=self.fits, peak_bytes=self.peak_bytes, flops_per_device=self.flops_per_device,
                   flops_per_item=self.flops_per_item)
        return out


def memory_of(compiled: Any) -> dict[str, int] | None:
    """Per-device bytes from XLA's memory analysis; peak = what must be resident at once:
    arguments + outputs - aliased (donated arguments reused as outputs) + temporaries + code."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    mem = {k: int(getattr(stats, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    mem["peak"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    return mem


def flops_of(compiled: Any) -> float | None:
    """FLOPs of one execution of the per-device program (XLA's cost analysis).

    The TPU compiler's `optimal_seconds` is not used: it is not a wall-time estimate we can
    defend (it came out negative for the SD1.5 UNet).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


@dataclasses.dataclass
class _Compiled:
    compiled: Any | None
    error: str | None
    seconds: float
    flops: flop_count.FlopCount


def _compile(traced: Any, hlo_path: Path | None) -> _Compiled:
    """Compiles a `jax.stages.Traced`; an out-of-memory refusal is returned, not raised."""
    flops = flop_count.count(traced.jaxpr)
    start = time.perf_counter()
    try:
        compiled = traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e).strip()
        if not _OOM.search(message):
            raise
        first = next((line for line in message.splitlines() if _OOM.search(line)), message.splitlines()[0])
        return _Compiled(None, first.strip(), time.perf_counter() - start, flops)
    seconds = time.perf_counter() - start
    if hlo_path is not None:  # the optimised per-device HLO, for reading what the compiler did
        hlo_path.parent.mkdir(parents=True, exist_ok=True)
        hlo_path.write_text(compiled.as_text())
    return _Compiled(compiled, None, seconds, flops)


def _plan(program: str, mesh: jax.sharding.Mesh, items: int, item: str, per_device: str, hbm_bytes: int,
          result: _Compiled) -> ProgramPlan:
    compiled = result.compiled
    return ProgramPlan(
        program=program, num_devices=mesh.devices.size, mesh=dict(mesh.shape), items_per_call=items, item=item,
        per_device=per_device, hbm_bytes=hbm_bytes, memory=None if compiled is None else memory_of(compiled),
        flops_per_call=result.flops.total,
        flop_breakdown={"dot": result.flops.dot, "conv": result.flops.conv, "pallas": result.flops.pallas,
                        "unknown_trip_counts": result.flops.unknown_trip_counts},
        compiler_flops_per_device=None if compiled is None else flops_of(compiled),
        compile_seconds=result.seconds, error=result.error)


def _hlo_path(config: Any, program: str, mesh: jax.sharding.Mesh) -> Path | None:
    if not config.plan.hlo_dir:
        return None
    kind = mesh.devices.flat[0].device_kind.replace(" ", "_")
    return Path(config.plan.hlo_dir) / f"{program}-{kind}-{mesh.devices.size}.hlo.txt"


def _abstract(shape: tuple[int, ...], dtype: Any, mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))


def train_batch_shapes(config: Any, sd: StableDiffusion, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one optimizer step as the loop feeds it (`training.train.step_inputs`)."""
    spec = losses.get_loss(config.train.loss)
    b = int(config.train.batch_size)
    c, h, w = candidates.latent_shape(sd.unet.config, sd.vae.config, int(config.model.resolution))
    batch = {losses.WINNER: _abstract((b, c, h, w), np.float32, mesh),
             losses.LOSER: _abstract((b, c, h, w), np.float32, mesh)}
    length = sd.tokenizers[0].model_max_length
    if config.train.text_encoding == "cached":
        ids = jax.ShapeDtypeStruct((len(sd.text_encoders), 1, length), np.int32)
        encoded = jax.eval_shape(lambda p, i: encode_tokens(sd.family, tuple(e.module for e in sd.text_encoders),
                                                            p, i),
                                 tuple(e.params for e in sd.text_encoders), ids)
    dtype = DtypePolicy.from_config(config.model).compute_dtype
    for slot in range(spec.num_prompts):
        if config.train.text_encoding == "in_step":
            batch[slot_key(INPUT_IDS, slot)] = _abstract((b, len(sd.text_encoders), length), np.int32, mesh)
        else:
            batch[slot_key(EMBEDS, slot)] = _abstract((b,) + encoded.embeds.shape[1:], dtype, mesh)
            if encoded.pooled is not None:
                batch[slot_key(POOLED, slot)] = _abstract((b,) + encoded.pooled.shape[1:], dtype, mesh)
    if sd.family == FAMILY_SDXL:
        batch[TIME_IDS] = _abstract((b, 6), np.float32, mesh)
    return batch


def plan_train_step(config: Any, sd: StableDiffusion, mesh: jax.sharding.Mesh, hbm_bytes: int) -> ProgramPlan:
    """Compiles `agfsync-jax train`'s step for `mesh` and reads its memory and FLOPs."""
    setup = build_training(config, sd, mesh)
    batch = train_batch_shapes(config, sd, mesh)
    result = _compile(setup.train_step.trace(setup.abstract_state, setup.frozen, batch),
                      _hlo_path(config, TRAIN, mesh))
    n = mesh.devices.size
    accum = int(config.train.grad_accum_steps)
    pairs = int(config.train.batch_size)
    per_device = (f"{pairs // n} pairs per device per step" +
                  (f" in {accum} microbatches of {pairs // n // accum}" if accum > 1 else ""))
    return _plan(TRAIN, mesh, pairs, "pair", per_device, hbm_bytes, result)


def _abstract_unconditional(sd: StableDiffusion) -> Conditioning:
    """Shapes of `candidates.unconditional(sd)`: the negative branch, batch 1, float32."""
    length = sd.tokenizers[0].model_max_length
    ids = jax.ShapeDtypeStruct((len(sd.text_encoders), 1, length), np.int32)
    encoders = tuple(e.module for e in sd.text_encoders)
    out = jax.eval_shape(lambda p, i: encode_tokens(sd.family, encoders, p, i),
                         tuple(e.params for e in sd.text_encoders), ids)
    f32 = lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, np.float32)  # noqa: E731
    return Conditioning(f32(out.embeds), f32(out.pooled))


def sampling_program(config: Any, sd: StableDiffusion, mesh: jax.sharding.Mesh) -> SamplingProgram:
    """`agfsync-jax sample`'s program (`sampling.stage._build_program`) from an abstract model."""
    s = config.sampling
    name = resolve_name(s.scheduler, sd.scheduler_config, f"{sd.path}/scheduler/scheduler_config.json")
    scheduler = make_scheduler(name, sd.scheduler_config, int(s.steps), eta=float(s.eta))
    models = candidates.candidate_models(sd, scheduler, int(config.model.resolution), float(s.guidance_scale),
                                         bool(s.save_png), attention=s.attention, mesh=mesh)
    return SamplingProgram(
        models, candidates.model_params(sd, bool(s.save_png)), _abstract_unconditional(sd), mesh,
        batch_size=int(s.batch_size), microbatch=int(s.microbatch),
        token_length=sd.tokenizers[0].model_max_length, guidance_scale=float(s.guidance_scale),
        param_mode=s.shard_params, min_shard_size=int(config.mesh.min_shard_size))


def plan_sampler(config: Any, sd: StableDiffusion, mesh: jax.sharding.Mesh, hbm_bytes: int) -> ProgramPlan:
    """Compiles `agfsync-jax sample`'s program for `mesh` and reads its memory and FLOPs."""
    s = config.sampling
    program = sampling_program(config, sd, mesh)
    result = _compile(program.trace(), _hlo_path(config, SAMPLE, mesh))
    n = mesh.devices.size
    images = int(s.batch_size)
    guided = float(s.guidance_scale) > 1.0
    per_device = (f"{images // n} images per device per call, {int(s.microbatch)} per UNet call "
                  f"({2 * int(s.microbatch) if guided else int(s.microbatch)} rows with guidance), "
                  f"{int(s.steps)} steps" + (", VAE decode" if s.save_png else ""))
    return _plan(SAMPLE, mesh, images, "image", per_device, hbm_bytes, result)
