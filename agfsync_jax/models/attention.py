"""Drop-in replacements for the attention of diffusers' Flax UNet (`FlaxAttention.__call__`).

    with flax.linen.intercept_methods(attention.interceptor_for("flash", mesh)):
        out = unet.apply({"params": params}, x_t, t, context)

Every kind computes what diffusers' `FlaxAttention` computes (same parameters, same math:
softmax(q k^T / sqrt(d)) v per head) with another kernel. The kinds (`ATTENTION_KINDS`; config
fields `train.attention` and `sampling.attention`):

* "diffusers": the module's own code (no interceptor);
* "fused": `attention` below, our XLA formula with a flash-style hand-written backward;
* "dot_product": `jax.nn.dot_product_attention`, with `implementation="cudnn"` (cuDNN's fused
  flash attention) on GPU and "xla" elsewhere. cuDNN takes only float16/bfloat16, so with float32
  compute on a GPU this kind is an error, not a silent switch to XLA;
* "flash": the platform's fused kernel. On TPU the Pallas TPU flash-attention kernel
  (`jax.experimental.pallas.ops.tpu.flash_attention`, with its forward and backward kernels),
  run under `shard_map` over the batch axes of the mesh so that each device attends over its own
  rows (the SPMD partitioner cannot split a custom kernel; it would gather the batch instead).
  On GPU the same as "dot_product" (cuDNN). On CPU the TPU kernel in Pallas' TPU interpret
  mode, which exists to test the kernel's math, not to be fast. The kernel's key blocks are
  multiples of 128 tokens and its head size is at most 128 or a multiple of 128, so other
  layers (the 77-token text context of cross-attention, SD1.5's 16 x 16 layers with 160-wide
  heads and its 64-token mid block) take "dot_product"'s XLA path: those layers are small, and
  the N x N memory that flash attention avoids is that of the 4096-token self-attention layers.

"fused" in detail:

* the 1/sqrt(d) scale is applied to the queries (N x d values) instead of to the N x N score
  matrix; on XLA:CPU the latter materialises a broadcast of the scale as large as the scores;
* scores are accumulated and the softmax computed in float32 (or wider) whatever the compute
  dtype (as PyTorch's fused attention does); diffusers' Flax code runs the softmax in the
  compute dtype;
* the gradient is a hand-written, flash-attention-style backward (`attention` below): the
  forward pass keeps only q, k, v, the output and the per-row log-sum-exp, and the backward
  recomputes the probabilities. Autodiff of the plain formula instead keeps the N x N
  probabilities of every attention layer alive until the backward pass (N = 4096 tokens at
  SD1.5's 64 x 64 latents: 64 MiB per head and image in float32) and spends one more N x N pass
  on the softmax gradient (delta = rowsum(dO * O) replaces rowsum(dP * P)).

What each kind saves at full size is in docs/performance.md (compile-only memory plans); the
gain depends on dtype and platform, so the default stays "diffusers". Interceptors leave
modules configured for diffusers' own memory-efficient (chunked) attention alone. Outputs and
gradients of every kind match diffusers' attention (tests/agfsync_jax/models/test_attention.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from agfsync_jax.sharding import MESH_AXES

ATTENTION_KINDS = ("diffusers", "fused", "dot_product", "flash")
# The Pallas TPU kernel tiles keys in blocks of this many tokens (its MIN_BLOCK_SIZE).
_FLASH_BLOCK = 128

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


# A core maps (q, k, v) of shape (B, T, H, d), unscaled, to the attention output (B, T, H, d).
Core = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


def _fused_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    b, n, heads, d = q.shape

    def to_heads(x: jax.Array) -> jax.Array:  # (B, T, H, d) -> (B*H, T, d)
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * heads, x.shape[1], d)

    out = attention(to_heads(q * jnp.asarray(scale, q.dtype)), to_heads(k), to_heads(v))
    return jnp.transpose(out.reshape(b, heads, n, d), (0, 2, 1, 3))


def _dot_product_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, *, implementation: str) -> jax.Array:
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention 'dot_product'/'flash' on GPU is cuDNN's flash attention, which takes float16 or "
            f"bfloat16, but the UNet computes in {q.dtype}: set model.compute_dtype=bfloat16, or choose "
            "another attention kind (diffusers, fused)")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def _flash_blocks(q_len: int, kv_len: int) -> Any:
    """Tile sizes of the Pallas TPU kernel: the largest of 512/256/128 tokens that divides."""
    from jax.experimental.pallas.ops.tpu.flash_attention import BlockSizes

    def major(n: int) -> int:
        return next(b for b in (512, 256, _FLASH_BLOCK) if n % b == 0)
    bq, bk = (major(q_len) if q_len % _FLASH_BLOCK == 0 else q_len), major(kv_len)
    return BlockSizes(block_q=bq, block_k_major=bk, block_k=_FLASH_BLOCK, block_b=1,
                      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=_FLASH_BLOCK, block_q_dkv=bq,
                      block_k_major_dq=bk, block_k_dq=_FLASH_BLOCK, block_q_dq=bq)


def _pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, interpret: bool) -> jax.Array:
    """The Pallas TPU kernel on (B, H, T, d) arrays; `interpret` runs it in TPU interpret mode."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    blocks = _flash_blocks(q.shape[2], k.shape[2])
    kernel = functools.partial(flash_attention, sm_scale=scale, block_sizes=blocks)

    def mode() -> Any:
        if not interpret:
            return contextlib.nullcontext()
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.force_tpu_interpret_mode()

    # Interpret mode is chosen when a Pallas call is traced; the backward kernels are traced
    # when the gradient is taken, so the forward and the backward each enter it themselves.
    @jax.custom_vjp
    def run(q, k, v):
        with mode():
            return kernel(q, k, v)

    def fwd(q, k, v):
        with mode():
            out, vjp = jax.vjp(kernel, q, k, v)
        return out, vjp

    def bwd(vjp, d_out):
        with mode():
            return vjp(d_out)

    run.defvjp(fwd, bwd)
    return run(q, k, v)


def _flash_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, *, mesh: Mesh | None,
                platform: str) -> jax.Array:
    if platform == "gpu":
        return _dot_product_core(q, k, v, scale, implementation="cudnn")
    head_dim = q.shape[-1]
    if k.shape[1] % _FLASH_BLOCK or q.shape[1] % 8 or (head_dim > 128 and head_dim % 128):  # the kernel's limits
        return _dot_product_core(q, k, v, scale, implementation="xla")
    interpret = platform != "tpu"

    def local(q, k, v):  # (B, T, H, d) -> the kernel's (B, H, T, d) and back
        to = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
        return to(_pallas_flash(to(q), to(k), to(v), scale, interpret))

    if mesh is None or mesh.devices.size == 1:
        return local(q, k, v)
    spec = P(tuple(a for a in MESH_AXES if a in mesh.axis_names))
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _flax_attention_call(module: Any, core: Core, hidden_states: jax.Array, context: jax.Array | None = None,
                         deterministic: bool = True) -> jax.Array:
    """diffusers' FlaxAttention.__call__ (non-chunked path) with `core` as its attention."""
    context = hidden_states if context is None else context
    q = module.query(hidden_states)  # the same Dense layers (and parameters) as the original
    k = module.key(context)
    v = module.value(context)
    heads, dim_head = module.heads, module.dim_head

    def split(x: jax.Array) -> jax.Array:  # (B, T, H*d) -> (B, T, H, d)
        return x.reshape(x.shape[0], x.shape[1], heads, dim_head)

    out = core(split(q), split(k), split(v), module.scale)
    out = module.proj_attn(out.reshape(out.shape[0], out.shape[1], heads * dim_head))
    return module.dropout_layer(out, deterministic=deterministic)


def _interceptor(core: Core) -> Callable[..., Any]:
    def intercept(next_fun, args, kwargs, context):
        """flax.linen method interceptor: routes FlaxAttention.__call__ to `core`."""
        from diffusers.models.attention_flax import FlaxAttention

        module = context.module
        if (context.method_name == "__call__" and isinstance(module, FlaxAttention)
                and not module.use_memory_efficient_attention):
            return _flax_attention_call(module, core, *args, **kwargs)
        return next_fun(*args, **kwargs)
    return intercept


# The "fused" kind's interceptor (kept under its original name).
interceptor = _interceptor(_fused_core)


def interceptor_for(kind: str, mesh: Mesh | None = None, field: str = "train.attention") -> Callable[..., Any] | None:
    """The flax method interceptor of attention `kind` for programs over `mesh` (None: diffusers').

    The platform (and so the kernel) is that of the mesh's devices, or JAX's default backend
    without a mesh; "flash" on a multi-device mesh runs its kernel per device under shard_map.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"{field}={kind!r}; expected one of {ATTENTION_KINDS}")
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if kind == "diffusers":
        return None
    if kind == "fused":
        return interceptor
    if kind == "dot_product":
        return _interceptor(functools.partial(_dot_product_core,
                                              implementation="cudnn" if platform == "gpu" else "xla"))
    return _interceptor(functools.partial(_flash_core, mesh=mesh, platform=platform))
