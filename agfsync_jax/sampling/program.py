"""The compiled sampling program: `candidates.generate` jitted over the device mesh.

The global batch is sharded over the mesh's ("data", "fsdp") axes; parameters are replicated
or FSDP-sharded by config. The program is compiled ahead of time, once, for one global batch
shape, and every batch of the run goes through that executable (an AOT executable cannot
recompile: a batch of another shape is an error, not a silent second compile).

Bitwise reproducibility. XLA picks kernels by shape, so a UNet row's last bits depend on the
shape of the call it is in, not only on its inputs. Each device therefore walks its share of
the batch in fixed chunks of `microbatch` examples (`lax.map`), so every UNet call has the
same shape, (2 x microbatch, C, h, w), whatever the global batch size and device count.
Together with per-example keys, a candidate is then bitwise the same on 1 or 8 devices, with
any batch size, and after resuming; changing `microbatch` changes the last bits only.
This holds with replicated parameters. With FSDP-sharded parameters XLA may split a
contraction across devices and sum the partial results, so the last bits then depend on the
mesh shape too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agfsync_jax import sharding
from agfsync_jax.sampling.candidates import CandidateModels, generate
from agfsync_jax.models.denoiser import Conditioning


def batch_shapes(models: CandidateModels, batch_size: int, token_length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """field -> (shape, dtype) of a global batch."""
    shapes = {
        "token_ids": ((batch_size, len(models.text_encoders), token_length), np.int32),
        "latent_keys": ((batch_size, 2), np.uint32),
        "step_noise_keys": ((batch_size, 2), np.uint32),
        "noise_keys": ((batch_size, 2), np.uint32),
        "embeds_sigma": ((batch_size,), np.float32),
        "pooled_sigma": ((batch_size,), np.float32),
        "time_ids": ((batch_size, 6), np.float32),
    }
    return {k: shapes[k] for k in models.batch_fields}


def check_batch_layout(batch_size: int, microbatch: int, num_devices: int, num_processes: int) -> None:
    if microbatch < 1:
        raise ValueError(f"sampling.microbatch must be >= 1, got {microbatch}")
    if batch_size < 1 or batch_size % (num_devices * microbatch):
        raise ValueError(
            f"sampling.batch_size={batch_size} must be a positive multiple of {num_devices} devices x "
            f"sampling.microbatch={microbatch} (= {num_devices * microbatch})")
    if batch_size % num_processes:
        raise ValueError(f"sampling.batch_size={batch_size} must divide evenly over {num_processes} processes")


def _flops(compiled: Any) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per partition
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


class SamplingProgram:
    """`generate` over the mesh, compiled once for `batch_size` examples per call.

    Usage:
        program = SamplingProgram(models, params, uncond, mesh, batch_size=8, microbatch=1, ...)
        out = program(local_batch)           # dispatches; returns global arrays
        rows = program.local_rows(out)       # this process's rows as numpy
    """

    def __init__(self, models: CandidateModels, params: Mapping[str, Any], uncond: Conditioning, mesh: Mesh, *,
                 batch_size: int, microbatch: int, token_length: int, guidance_scale: float,
                 param_mode: str = "replicate", min_shard_size: int = 2**16):
        self.models = models
        self.mesh = mesh
        self.num_devices = mesh.devices.size
        check_batch_layout(batch_size, microbatch, self.num_devices, jax.process_count())
        self.batch_size = batch_size
        self.microbatch = microbatch
        self.local_batch_size = batch_size // jax.process_count()
        self._shapes = batch_shapes(models, batch_size, token_length)

        self._param_shardings = sharding.param_shardings(params, mesh, param_mode, min_shard_size)
        self.params = sharding.place_tree(params, self._param_shardings)
        self.sharded_param_arrays = sum(s.spec != P() for s in jax.tree.leaves(self._param_shardings))
        replicated = sharding.replicated(mesh)
        # Abstract parameters and conditioning (ShapeDtypeStructs) give a compile-only program
        # (the TPU plan in agfsync_jax/plan): placed abstractly, compiled, never run.
        self.abstract = sharding.is_abstract(params)
        if not self.abstract:
            uncond = Conditioning(np.asarray(uncond.embeds),
                                  None if uncond.pooled is None else np.asarray(uncond.pooled))
        self._uncond_shardings = jax.tree.map(lambda _: replicated, uncond)
        self.uncond = sharding.place_tree(uncond, self._uncond_shardings)
        scale = jax.ShapeDtypeStruct((), np.float32) if self.abstract else np.float32(guidance_scale)
        self.guidance_scale = sharding.place_tree(scale, replicated)

        batch_sharding = sharding.batch_sharding(mesh)
        self._batch_shardings = {k: batch_sharding for k in self._shapes}
        self._jitted = jax.jit(
            self._global_fn,
            in_shardings=(self._param_shardings, self._batch_shardings, self._uncond_shardings, replicated),
            out_shardings=batch_sharding)
        self.compiled: Any = None
        self.compile_seconds = 0.0
        self.flops: float | None = None

    def _constrain(self, x: jax.Array, spec: P) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _global_fn(self, params, batch, uncond, guidance_scale):
        n_dev, mb = self.num_devices, self.microbatch
        k = self.batch_size // (n_dev * mb)
        chunk_spec = P(None, sharding.MESH_AXES)

        def to_chunks(x):
            # Device d holds rows [d*k*mb, (d+1)*k*mb); chunk j takes rows j*mb..(j+1)*mb of every
            # device, so no row moves between devices.
            x = jnp.swapaxes(x.reshape((n_dev, k, mb) + x.shape[1:]), 0, 1)
            return self._constrain(x.reshape((k, n_dev * mb) + x.shape[3:]), chunk_spec)

        def from_chunks(y):
            y = jnp.swapaxes(y.reshape((k, n_dev, mb) + y.shape[2:]), 0, 1)
            return self._constrain(y.reshape((self.batch_size,) + y.shape[3:]), sharding.BATCH_SPEC)

        def one_chunk(chunk):
            chunk = {name: self._constrain(x, sharding.BATCH_SPEC) for name, x in chunk.items()}
            out = generate(self.models, params, chunk, uncond, guidance_scale)
            return {name: self._constrain(y, sharding.BATCH_SPEC) for name, y in out.items()}

        out = jax.lax.map(one_chunk, {name: to_chunks(x) for name, x in batch.items()})
        return {name: from_chunks(y) for name, y in out.items()}

    def trace(self) -> Any:
        """The program traced for this batch layout (`jax.stages.Traced`), from shapes only."""
        abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                       self.params, self._param_shardings)
        abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self._batch_shardings[k])
                          for k, (shape, dtype) in self._shapes.items()}
        return self._jitted.trace(abstract_params, abstract_batch, self.uncond, self.guidance_scale)

    def lower(self) -> Any:
        """The program lowered for this batch layout (`jax.stages.Lowered`)."""
        return self.trace().lower()

    def compile(self) -> None:
        """Lowers and compiles the program once; records compile time and XLA's FLOP estimate."""
        start = time.perf_counter()
        self.compiled = self.lower().compile()
        self.compile_seconds = time.perf_counter() - start
        self.flops = _flops(self.compiled)
        logging.info("sampling program compiled in %.1f s (global batch %d, microbatch %d, %d devices, "
                     "%d parameter arrays sharded, XLA estimate %.3g FLOPs per call)", self.compile_seconds,
                     self.batch_size, self.microbatch, self.num_devices, self.sharded_param_arrays,
                     self.flops or float("nan"))

    def __call__(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Dispatches one batch (this process's rows) and returns the global outputs without waiting."""
        if self.abstract:
            raise ValueError("this SamplingProgram was built from abstract parameters: it compiles, it cannot run")
        if self.compiled is None:
            self.compile()
        for name, (shape, dtype) in self._shapes.items():
            want = (self.local_batch_size,) + shape[1:]
            got = np.shape(local_batch[name])
            if got != want:
                raise ValueError(f"batch field {name!r} has shape {got}, the compiled program expects {want}")
        batch = sharding.place_batch({k: np.asarray(local_batch[k], self._shapes[k][1]) for k in self._shapes},
                                     self.mesh)
        return self.compiled(self.params, batch, self.uncond, self.guidance_scale)

    @staticmethod
    def local_rows(outputs: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
        """This process's rows of each batch-sharded output, in global order, as numpy."""
        def rows(x: jax.Array) -> np.ndarray:
            shards = {(s.index[0].start or 0): s for s in x.addressable_shards}
            return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])
        return {name: rows(x) for name, x in outputs.items()}
