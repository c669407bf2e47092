"""A faster drop-in for the attention of diffusers' Flax UNet (`FlaxAttention.__call__`).

    with flax.linen.intercept_methods(attention.interceptor):
        out = unet.apply({"params": params}, x_t, t, context)

computes exactly what diffusers' `FlaxAttention` computes (same parameters, same math), but:

* the 1/sqrt(d) scale is applied to the queries (N x d values) instead of to the N x N score
  matrix; on XLA:CPU the latter materialises a broadcast of the scale as large as the scores;
* scores are accumulated and the softmax computed in float32 (or wider) whatever the compute dtype (as
  PyTorch's fused attention does); diffusers' Flax code runs the softmax in the compute dtype;
* the gradient is a hand-written, flash-attention-style backward (`attention` below): the
  forward pass keeps only q, k, v, the output and the per-row log-sum-exp, and the backward
  recomputes the probabilities. Autodiff of the plain formula instead keeps the N x N
  probabilities of every attention layer alive until the backward pass (N = 4096 tokens at
  SD1.5's 64 x 64 latents: 64 MiB per head and image in float32) and spends one more N x N pass
  on the softmax gradient (delta = rowsum(dO * O) replaces rowsum(dP * P)).

The interceptor leaves modules configured for diffusers' own memory-efficient (chunked)
attention alone. It is applied where the training step runs the UNet
(`agfsync_jax.training.objective.make_denoiser`) with `train.attention="fused"`; the default stays
diffusers' attention because the gain depends on the dtype. Measured with the compile-only memory
plan of the full SD1.5 step at one pair per device (docs/performance.md): float32 temporaries drop
from 24.7 to 13.5 GiB (16.8 to 10.6 GiB with XLA:CPU's memory-minimising scheduler), but under
bfloat16 compute they grow, from 16.6 to 18.9 GiB (and from 11.0 to 12.5 GiB with per-layer remat
and the memory-minimising scheduler): the recomputed N x N blocks are float32 here, diffusers
keeps bfloat16 probabilities. Outputs and gradients
match diffusers' attention to ~1e-6 (tests/agfsync_jax/models/test_attention.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

def _acc(*xs: jax.Array) -> Any:
    """Accumulation dtype: float32, or wider when the inputs are (float64 in parity tests)."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    return jnp.einsum("bnd,bmd->bnm", q, k, preferred_element_type=_acc(q, k))


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over (batch*heads, tokens, head_dim) arrays; q is already scaled."""
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array):
    s = _scores(q, k)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bnm,bmd->bnd", e.astype(v.dtype), v, preferred_element_type=_acc(v)) / denom
    lse = m + jnp.log(denom)  # (B, N, 1) in the accumulation dtype
    out = out.astype(q.dtype)
    return out, (q, k, v, out, lse)


def _attention_bwd(res, d_out: jax.Array):
    q, k, v, out, lse = res
    p = jnp.exp(_scores(q, k) - lse)  # the forward's probabilities, recomputed
    acc = _acc(q, k, v, d_out)
    d_v = jnp.einsum("bnm,bnd->bmd", p.astype(d_out.dtype), d_out, preferred_element_type=acc)
    d_p = jnp.einsum("bnd,bmd->bnm", d_out, v, preferred_element_type=acc)
    # rowsum(dP * P) == rowsum(dO * O): an N x d reduction instead of an N x N one.
    delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1, keepdims=True)
    d_s = p * (d_p - delta)
    d_q = jnp.einsum("bnm,bmd->bnd", d_s.astype(k.dtype), k, preferred_element_type=acc)
    d_k = jnp.einsum("bnm,bnd->bmd", d_s.astype(q.dtype), q, preferred_element_type=acc)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


attention.defvjp(_attention_fwd, _attention_bwd)


def _flax_attention_call(module: Any, hidden_states: jax.Array, context: jax.Array | None = None,
                         deterministic: bool = True) -> jax.Array:
    """diffusers' FlaxAttention.__call__ (non-chunked path) with `attention` as its core."""
    context = hidden_states if context is None else context
    # Same Dense layers (and parameters) as the original; the scale moves onto the queries.
    q = module.query(hidden_states) * jnp.asarray(module.scale, hidden_states.dtype)
    k = module.key(context)
    v = module.value(context)
    b, n = q.shape[:2]
    heads, dim_head = module.heads, module.dim_head

    def to_heads(x: jax.Array) -> jax.Array:  # (B, T, H*d) -> (B*H, T, d)
        x = x.reshape(x.shape[0], x.shape[1], heads, dim_head)
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0] * heads, x.shape[1], dim_head)

    out = attention(to_heads(q), to_heads(k), to_heads(v))
    out = jnp.transpose(out.reshape(b, heads, n, dim_head), (0, 2, 1, 3)).reshape(b, n, heads * dim_head)
    out = module.proj_attn(out)
    return module.dropout_layer(out, deterministic=deterministic)


def interceptor(next_fun, args, kwargs, context):
    """flax.linen method interceptor: routes FlaxAttention.__call__ to `_flax_attention_call`."""
    from diffusers.models.attention_flax import FlaxAttention

    module = context.module
    if (context.method_name == "__call__" and isinstance(module, FlaxAttention)
            and not module.use_memory_efficient_attention):
        return _flax_attention_call(module, *args, **kwargs)
    return next_fun(*args, **kwargs)
