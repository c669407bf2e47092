"""Per-candidate seeds and JAX keys, derived from what a candidate *is*, never where it runs.

A candidate is identified by (global seed, prompt id, instruction, candidate index). Its seed is
a stable 63-bit hash of that identity (BLAKE2b: the same on every machine, Python version and
run; Python's `hash()` is salted per process and would not be). The seed is what the manifest
records. Each random stream of the candidate gets its own key, hashed from (seed, stream name),
so adding a stream never shifts another one.

Key data are threefry2x32 keys as (2,) uint32, i.e. `jax.random.PRNGKey(s)` for s < 2**63
(under jax_enable_x64), passed to the sampling program as ordinary arrays: keys are traced
inputs, so no seed ever triggers a recompilation.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SEP = "\x1f"  # unit separator: cannot occur in a JSON-decoded id by accident of concatenation
_MASK_63 = (1 << 63) - 1

# Stream names. "latents" are the initial latents; "embedding_noise" the Gaussian noise on the
# conditional text embedding (and, if enabled, on SDXL's pooled embedding); "step_noise" the
# noise that LCM and DDIM with eta > 0 inject between denoising steps.
LATENTS = "latents"
EMBEDDING_NOISE = "embedding_noise"
STEP_NOISE = "step_noise"


def _hash63(*parts: object) -> int:
    text = _SEP.join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _MASK_63


def candidate_seed(global_seed: int, prompt_id: str, instruction: int, candidate: int) -> int:
    """The seed of one candidate image, in [0, 2**63)."""
    return _hash63("candidate", global_seed, prompt_id, instruction, candidate)


def shared_latents_seed(global_seed: int, candidate: int) -> int:
    """Seed of initial latents shared by all prompts (the authors' released sampler reuses the same
    initial latents for every prompt; `sampling.shared_initial_latents` reproduces that)."""
    return _hash63("shared_latents", global_seed, candidate)


def stream_seed(seed: int, stream: str) -> int:
    """Seed of one random stream of a candidate."""
    return _hash63("stream", seed, stream)


def key_data(seed: int) -> np.ndarray:
    """(2,) uint32 threefry key data of a 63-bit seed (equal to `jax.random.PRNGKey(seed)` with x64)."""
    if not 0 <= seed <= _MASK_63:
        raise ValueError(f"seed {seed} is not in [0, 2**63)")
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
