"""The compiled encoding program: `vae_encoder.encode_latents` jitted over the device mesh.

    program = EncodingProgram(sd.vae, mesh, batch_size=8, mode="sample")
    latents = program.local_rows(program(local_pixels, local_key_data))   # this process's rows

Like the sampling program (sampling/program.py): the global batch is sharded over the mesh's
("data", "fsdp") axes, the VAE parameters are replicated or FSDP-sharded, and the program is
compiled ahead of time for one global batch shape, so every call (the last one padded) reuses
one executable. Each process passes only its own rows.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from agfsync_jax import sharding
from agfsync_jax.encoding.vae_encoder import LATENT_MODES, encode_latents
from agfsync_jax.models.loading import FlaxComponent
from agfsync_jax.sampling.program import SamplingProgram


def check_batch_layout(batch_size: int, num_devices: int, num_processes: int) -> None:
    if batch_size < 1 or batch_size % num_devices or batch_size % num_processes:
        raise ValueError(f"encode.batch_size={batch_size} must be a positive multiple of the device count "
                         f"({num_devices}) and of the process count ({num_processes})")


class EncodingProgram:
    """Images -> UNet-space latents over the mesh, compiled once for `batch_size` images."""

    def __init__(self, vae: FlaxComponent, mesh: Mesh, *, batch_size: int, resolution: int, mode: str,
                 param_mode: str = "replicate", min_shard_size: int = 2**16):
        if mode not in LATENT_MODES:
            raise ValueError(f"encode.latent={mode!r}, expected one of {LATENT_MODES}")
        check_batch_layout(batch_size, mesh.devices.size, jax.process_count())
        self.mesh = mesh
        self.batch_size = batch_size
        self.local_batch_size = batch_size // jax.process_count()
        self.resolution = resolution
        self._param_shardings = sharding.param_shardings(vae.params, mesh, param_mode, min_shard_size)
        self.params = sharding.place_tree(vae.params, self._param_shardings)
        self.sharded_param_arrays = sum(s.spec != P() for s in jax.tree.leaves(self._param_shardings))
        module, config = vae.module, dict(vae.config)
        batch_sharding = sharding.batch_sharding(mesh)
        self._jitted = jax.jit(
            lambda params, pixels, key_data: encode_latents(module, params, config, pixels, key_data, mode),
            in_shardings=(self._param_shardings, batch_sharding, batch_sharding), out_shardings=batch_sharding)
        self._shapes = {"pixels": ((batch_size, 3, resolution, resolution), np.float32),
                        "key_data": ((batch_size, 2), np.uint32)}
        self.compiled: Any = None
        self.compile_seconds = 0.0

    def compile(self) -> None:
        batch_sharding = sharding.batch_sharding(self.mesh)
        abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                       self.params, self._param_shardings)
        abstract = [jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                    for shape, dtype in self._shapes.values()]
        start = time.perf_counter()
        self.compiled = self._jitted.lower(abstract_params, *abstract).compile()
        self.compile_seconds = time.perf_counter() - start
        logging.info("encoding program compiled in %.1f s (global batch %d, %d devices, %d parameter arrays "
                     "sharded)", self.compile_seconds, self.batch_size, self.mesh.devices.size,
                     self.sharded_param_arrays)

    def __call__(self, pixels: np.ndarray, key_data: np.ndarray) -> jax.Array:
        """Dispatches one batch (this process's rows) and returns the global latents without waiting."""
        if self.compiled is None:
            self.compile()
        local = {"pixels": pixels, "key_data": key_data}
        for name, (shape, dtype) in self._shapes.items():
            want = (self.local_batch_size,) + shape[1:]
            if np.shape(local[name]) != want:
                raise ValueError(f"{name} has shape {np.shape(local[name])}, the compiled program expects {want}")
        batch = sharding.place_batch({k: np.asarray(v, self._shapes[k][1]) for k, v in local.items()}, self.mesh)
        return self.compiled(self.params, batch["pixels"], batch["key_data"])

    @staticmethod
    def local_rows(latents: jax.Array) -> np.ndarray:
        """This process's rows of the global latents, in global order, as numpy."""
        return SamplingProgram.local_rows({"latents": latents})["latents"]
