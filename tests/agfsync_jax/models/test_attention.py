"""The fused attention (flash-style backward) computes what diffusers' Flax attention computes:
same UNet outputs and gradients, on the tiny SD1.x and SDXL UNets, through the training
denoiser that switches it on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agfsync_jax.models.denoiser import Conditioning, make_denoiser


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny_sd1", "tiny_sdxl"])
def test_fused_attention_matches_diffusers_forward_and_gradient(family, request, unet_inputs):
    sd = request.getfixturevalue(family)
    unet = sd.unet
    x, t, cond, target = unet_inputs(sd)

    def loss(denoiser):
        return jax.value_and_grad(lambda p: jnp.mean((denoiser(p, x, t, cond) - target) ** 2))

    plain, fused = make_denoiser(unet.module), make_denoiser(unet.module, attention="fused")
    out_plain, out_fused = plain(unet.params, x, t, cond), fused(unet.params, x, t, cond)
    forward_diff = float(jnp.max(jnp.abs(out_plain - out_fused)))
    (l_plain, g_plain), (l_fused, g_fused) = loss(plain)(unet.params), loss(fused)(unet.params)
    grad_diff = max(float(jnp.max(jnp.abs(a - c))) for a, c in
                    zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_fused)))
    grad_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(g_plain))
    print(f"{family}: forward max abs diff {forward_diff:.2e}, gradient max abs diff {grad_diff:.2e} "
          f"(largest gradient {grad_scale:.2e})")
    assert forward_diff < 1e-4 and float(jnp.max(jnp.abs(out_plain))) > 0.1
    np.testing.assert_allclose(l_fused, l_plain, rtol=1e-5)
    assert grad_diff < 1e-5 * grad_scale


def test_fused_attention_changes_the_program(tiny_sd1):
    """The switch really routes attention through the custom VJP (not a silent no-op)."""
    args = (tiny_sd1.unet.params, jnp.zeros((1, 4, 16, 16)), jnp.zeros((1,), jnp.int32),
            Conditioning(jnp.zeros((1, 77, tiny_sd1.unet.config["cross_attention_dim"]))))
    plain = str(jax.make_jaxpr(make_denoiser(tiny_sd1.unet.module))(*args))
    fused = str(jax.make_jaxpr(make_denoiser(tiny_sd1.unet.module, attention="fused"))(*args))
    assert "custom_vjp_call" not in plain and "custom_vjp_call" in fused
    with pytest.raises(ValueError, match="train.attention"):
        make_denoiser(tiny_sd1.unet.module, attention="flash3")


# --- the platform kernels: jax.nn.dot_product_attention and the Pallas TPU flash kernel ----------

def _reference_attention(q, k, v, scale):
    """softmax(q k^T * scale) v per head on (B, T, H, d): the formula, independent of our code."""
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("kind", ["dot_product", "flash"])
@pytest.mark.parametrize("family", ["tiny_sd1", "tiny_sdxl"])
def test_platform_attention_matches_diffusers_forward_and_gradient(kind, family, request, unet_inputs):
    """On CPU, "flash" is the Pallas TPU kernel in interpret mode (tiny SD1's 16 x 16 = 256-token
    self-attention), "dot_product" is jax.nn.dot_product_attention's XLA path."""
    sd = request.getfixturevalue(family)
    unet = sd.unet
    x, t, cond, target = unet_inputs(sd)
    plain, other = make_denoiser(unet.module), make_denoiser(unet.module, attention=kind)

    def loss(denoiser):
        return jax.value_and_grad(lambda p: jnp.mean((denoiser(p, x, t, cond) - target) ** 2))

    out_plain, out_other = plain(unet.params, x, t, cond), jax.jit(other)(unet.params, x, t, cond)
    forward_diff = float(jnp.max(jnp.abs(out_plain - out_other)))
    (l_plain, g_plain), (l_other, g_other) = loss(plain)(unet.params), jax.jit(loss(other))(unet.params)
    grad_diff = max(float(jnp.max(jnp.abs(a - c))) for a, c in
                    zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_other)))
    grad_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(g_plain))
    print(f"{family} {kind}: forward max abs diff {forward_diff:.2e}, gradient max abs diff {grad_diff:.2e} "
          f"(largest gradient {grad_scale:.2e})")
    assert forward_diff < 1e-4 and float(jnp.max(jnp.abs(out_plain))) > 0.1
    np.testing.assert_allclose(l_other, l_plain, rtol=1e-5)
    assert grad_diff < 1e-5 * grad_scale


def test_flash_runs_the_pallas_kernel_where_the_lengths_allow(tiny_sd1):
    """256-token self-attention goes through the Pallas kernel (forward and backward); the
    77-token cross-attention through XLA; both equal the formula."""
    from agfsync_jax.models import attention

    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    # (key length, head size): SD's 77-token text context and SD1.5's 160-wide heads go to XLA.
    for kv_len, d, expect_kernel in ((256, 16, True), (77, 16, False), (256, 160, False)):
        q = jax.random.normal(keys[0], (2, 256, 2, d))
        k, v = (jax.random.normal(kk, (2, kv_len, 2, d)) for kk in keys[1:])
        scale = d ** -0.5

        def core(q, k, v):
            return attention._flash_core(q, k, v, scale, mesh=None, platform="cpu")

        def grads(f):
            return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))

        np.testing.assert_allclose(jax.jit(core)(q, k, v), _reference_attention(q, k, v, scale), atol=2e-6)
        for a, b in zip(jax.jit(grads(core))(q, k, v), grads(lambda *a: _reference_attention(*a, scale))(q, k, v)):
            np.testing.assert_allclose(a, b, atol=5e-6)
        assert ("pallas_call" in str(jax.make_jaxpr(grads(core))(q, k, v))) == expect_kernel

    args = (tiny_sd1.unet.params, jnp.zeros((1, 4, 16, 16)), jnp.zeros((1,), jnp.int32),
            Conditioning(jnp.zeros((1, 77, tiny_sd1.unet.config["cross_attention_dim"]))))
    assert "pallas_call" in str(jax.make_jaxpr(make_denoiser(tiny_sd1.unet.module, attention="flash"))(*args))
    assert "pallas_call" not in str(jax.make_jaxpr(make_denoiser(tiny_sd1.unet.module, attention="dot_product"))(*args))


def test_cudnn_attention_refuses_float32_instead_of_switching_kernels():
    from agfsync_jax.models import attention

    q = jnp.zeros((1, 128, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="model.compute_dtype=bfloat16"):
        attention._dot_product_core(q, q, q, 0.25, implementation="cudnn")


def test_flash_on_a_two_device_mesh_runs_the_kernel_per_device(run_python):
    """With a batch-sharded mesh the kernel runs under shard_map, each device on its own rows.
    (Traced, not run: Pallas' TPU interpret mode does not execute across CPU devices; the
    kernel's numerics are checked on one device above, its TPU compilation by the plan tests.)"""
    run_python("""
import jax, jax.numpy as jnp
import ml_collections
from agfsync_jax import sharding
from agfsync_jax.models import attention
mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 2}))
q = jnp.zeros((4, 256, 2, 16))
jaxpr = jax.make_jaxpr(lambda q: attention._flash_core(q, q, q, 0.25, mesh=mesh, platform="cpu"))(q)

def find(jaxpr, name):
    for e in jaxpr.eqns:
        if e.primitive.name == name:
            yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from find(inner, name)

(outer,) = find(jaxpr.jaxpr, "shard_map")
(kernel,) = find(outer.params["jaxpr"], "pallas_call")
assert kernel.invars[0].aval.shape == (2, 2, 256, 16), kernel.invars[0].aval.shape  # (B / 2, H, T, d)
print("ok")
""", devices=2)
