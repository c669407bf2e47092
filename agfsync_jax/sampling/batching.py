"""Host batches of examples: fixed size, padded, every per-example input computed per example.

A batch always has the compiled program's shape. Padding rows are inert copies of a dummy
example whose outputs are dropped; since every random draw comes from the example's own key,
a real example's result never depends on the padding or on its position in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from agfsync_jax.models.text_encoding import sdxl_time_ids, tokenize
from agfsync_jax.sampling import candidate_seeds
from agfsync_jax.sampling.work_plan import Example


def chunked(examples: Sequence[Example], size: int) -> Iterator[list[Example | None]]:
    """Consecutive groups of `size` examples; the last is padded with None."""
    for start in range(0, len(examples), size):
        group: list[Example | None] = list(examples[start:start + size])
        yield group + [None] * (size - len(group))


def candidate_noise_sigma(example: Example, noise_sigma: float, clean_first_candidate: bool) -> float:
    """The embedding-noise scale of one candidate (0 for a clean candidate 0)."""
    return 0.0 if clean_first_candidate and example.candidate == 0 else float(noise_sigma)


def host_batch(group: Sequence[Example | None], *, tokenizers: Sequence[Any], sampling: Any, global_seed: int,
               sdxl_resolution: int | None) -> dict[str, np.ndarray]:
    """The program's per-example inputs for a group (None = padding).

    Args:
        sampling: the `config.sampling` section (noise_sigma, clean_first_candidate,
            pooled_noise_sigma, shared_initial_latents).
        sdxl_resolution: the SDXL micro-conditioning resolution, or None for SD1.x.
    """
    n = len(group)
    texts = [e.text if e is not None else "" for e in group]
    latent_keys = np.zeros((n, 2), np.uint32)
    step_noise_keys = np.zeros((n, 2), np.uint32)
    noise_keys = np.zeros((n, 2), np.uint32)
    embeds_sigma = np.zeros((n,), np.float32)
    pooled_sigma = np.zeros((n,), np.float32)
    for row, example in enumerate(group):
        if example is None:
            continue
        latents_seed = (candidate_seeds.shared_latents_seed(global_seed, example.candidate)
                        if sampling.shared_initial_latents else example.seed)
        latent_keys[row] = candidate_seeds.key_data(
            candidate_seeds.stream_seed(latents_seed, candidate_seeds.LATENTS))
        # The step noise belongs with the initial latents: the authors' sampler draws both from
        # one default-seeded generator per call, i.e. the same for every prompt.
        step_noise_keys[row] = candidate_seeds.key_data(
            candidate_seeds.stream_seed(latents_seed, candidate_seeds.STEP_NOISE))
        noise_keys[row] = candidate_seeds.key_data(
            candidate_seeds.stream_seed(example.seed, candidate_seeds.EMBEDDING_NOISE))
        embeds_sigma[row] = candidate_noise_sigma(example, sampling.noise_sigma, sampling.clean_first_candidate)
        pooled_sigma[row] = candidate_noise_sigma(example, sampling.pooled_noise_sigma,
                                                  sampling.clean_first_candidate)
    batch = {
        # (B, E, L): the program wants examples first.
        "token_ids": np.ascontiguousarray(np.swapaxes(tokenize(tokenizers, texts), 0, 1)),
        "latent_keys": latent_keys, "step_noise_keys": step_noise_keys, "noise_keys": noise_keys,
        "embeds_sigma": embeds_sigma, "pooled_sigma": pooled_sigma,
    }
    if sdxl_resolution is not None:
        batch["time_ids"] = sdxl_time_ids(sdxl_resolution, n)
    return batch
