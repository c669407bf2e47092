"""Prompt text -> what the train step's batch carries: token ids, or cached embeddings.

With `train.text_encoding = "in_step"` the batch carries token ids and the step runs the frozen
text encoders. With "cached", `PromptEncoder` encodes each distinct prompt once, outside the
step, on this process's first local device, and memoises the result on the host in the compute
dtype (the UNet casts its context to that dtype anyway, so nothing is lost). The step then
carries no text encoder. Host memory grows with the number of distinct prompts (L x D values
each: 77 x 768 for SD1.x, 77 x 2048 for SDXL).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from agfsync_jax.models.loading import StableDiffusion
from agfsync_jax.models.text_encoding import TextEmbeddings, encode_tokens, tokenize

# Prompts are encoded in fixed-size chunks so that only one program is ever compiled.
_CHUNK = 16


def token_ids(sd: StableDiffusion, prompts: Sequence[str]) -> np.ndarray:
    """(B, num_encoders, L) int32, batch first so that it shards like every other batch array."""
    return np.ascontiguousarray(np.swapaxes(tokenize(sd.tokenizers, prompts), 0, 1))


def step_text_encoder(sd: StableDiffusion):
    """The pure (encoder params, ids (E, B, L)) -> TextEmbeddings the train step calls."""
    return functools.partial(encode_tokens, sd.family, tuple(c.module for c in sd.text_encoders))


class PromptEncoder:
    """Memoised prompt -> (embeds (L, D), pooled (P,) or None), encoded on one local device."""

    def __init__(self, sd: StableDiffusion, dtype: np.dtype, device: jax.Device | None = None):
        if not sd.text_encoders:
            raise ValueError(f"{sd.path}: text encoders were not loaded")
        self._sd = sd
        self._dtype = dtype
        self._device = device or jax.local_devices()[0]
        self._params = jax.device_put(tuple(c.params for c in sd.text_encoders), self._device)
        self._encode = jax.jit(step_text_encoder(sd))
        self._cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def _fill(self, prompts: list[str]) -> None:
        for start in range(0, len(prompts), _CHUNK):
            chunk = prompts[start:start + _CHUNK]
            padded = chunk + [""] * (_CHUNK - len(chunk))
            ids = jax.device_put(tokenize(self._sd.tokenizers, padded), self._device)
            out = jax.device_get(self._encode(self._params, ids))
            for i, prompt in enumerate(chunk):
                pooled = None if out.pooled is None else np.asarray(out.pooled[i], self._dtype)
                self._cache[prompt] = (np.asarray(out.embeds[i], self._dtype), pooled)

    def __call__(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Numpy embeddings (B, L, D) and pooled (B, P) or None, in the compute dtype."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            self._fill(missing)
        rows = [self._cache[p] for p in prompts]
        pooled = None if rows[0][1] is None else np.stack([r[1] for r in rows])
        return TextEmbeddings(np.stack([r[0] for r in rows]), pooled)
