"""Tokenising and encoding prompts with the CLIP text encoder(s), as the diffusers pipelines do.

SD1.x conditions on the last hidden state of one encoder. SDXL concatenates the penultimate
hidden states of both encoders and adds the second encoder's projected pooled embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agfsync_jax.models.loading import FAMILY_SDXL, StableDiffusion


class TextEmbeddings(NamedTuple):
    embeds: jax.Array  # (B, L, D): cross-attention context
    pooled: jax.Array | None  # (B, P) for SDXL, None for SD1.x


def tokenize(tokenizers: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
    """(num_encoders, B, max_length) int32 token ids, padded and truncated like diffusers."""
    ids = [tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="np").input_ids for tok in tokenizers]
    return np.stack(ids).astype(np.int32)


def encode_tokens(family: str, encoders: Sequence[Any], encoder_params: Sequence[Any],
                  token_ids: jax.Array) -> TextEmbeddings:
    """Pure and jittable: `encoders` are static Flax models, the rest are arrays."""
    if family != FAMILY_SDXL:
        out = encoders[0](token_ids[0], params=encoder_params[0], train=False)
        return TextEmbeddings(out.last_hidden_state, None)
    hidden = []
    pooled = None
    for encoder, params, ids in zip(encoders, encoder_params, token_ids):
        out = encoder(ids, params=params, output_hidden_states=True, train=False)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise ValueError("SDXL needs a projection text encoder as its second encoder")
    return TextEmbeddings(jnp.concatenate(hidden, axis=-1), pooled)


def unconditional_embeddings(sd: StableDiffusion, cond: TextEmbeddings,
                             empty: TextEmbeddings) -> TextEmbeddings:
    """The negative branch of classifier-free guidance for an empty negative prompt.

    SDXL pipelines with `force_zeros_for_empty_prompt` use zeros rather than the encoding of "".
    """
    if sd.force_zeros_for_empty_prompt:
        return TextEmbeddings(jnp.zeros_like(cond.embeds),
                              None if cond.pooled is None else jnp.zeros_like(cond.pooled))
    return empty


def sdxl_time_ids(resolution: int, batch: int) -> np.ndarray:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per example."""
    return np.tile(np.array([[resolution, resolution, 0, 0, resolution, resolution]], np.float32),
                   (batch, 1))
