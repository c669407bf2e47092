"""The jaxpr FLOP counter: exact on known formulas, loops by trip count, the tiny UNet as counted
analytically by benchmarks/flops.py (which torch.utils.flop_counter cross-checks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from agfsync_jax.plan import flop_count


def test_matmul_conv_and_loops():
    a, b = jnp.zeros((8, 32)), jnp.zeros((32, 16))
    assert flop_count.count(jax.make_jaxpr(jnp.matmul)(a, b)).dot == 2 * 8 * 32 * 16

    x, w = jnp.zeros((2, 3, 10, 10)), jnp.zeros((5, 3, 3, 3))  # NCHW, OIHW, SAME padding
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")  # noqa: E731
    assert flop_count.count(jax.make_jaxpr(conv)(x, w)).conv == 2 * (2 * 5 * 10 * 10) * (3 * 3 * 3)

    def looped(a, b):  # a fori_loop with static bounds is a scan of that length
        return jax.lax.fori_loop(0, 7, lambda i, acc: acc + a @ b, jnp.zeros((8, 16)))
    assert flop_count.count(jax.make_jaxpr(looped)(a, b)).dot == 7 * 2 * 8 * 32 * 16

    def grad_of_matmul(a, b):  # the backward pass: two more matmuls of the same size
        return jax.grad(lambda a: jnp.sum(a @ b))(a)
    assert flop_count.count(jax.make_jaxpr(grad_of_matmul)(a, b)).dot == 2 * 2 * 8 * 32 * 16


def test_tiny_unet_forward_matches_the_analytical_count(tiny_sd1):
    from benchmarks import flops as analytical
    from agfsync_jax.models.denoiser import Conditioning, make_denoiser

    unet = tiny_sd1.unet
    args = (unet.params, jnp.zeros((1, 4, 16, 16)), jnp.zeros((1,), jnp.int32),
            Conditioning(jnp.zeros((1, 77, unet.config["cross_attention_dim"]))))
    counted = flop_count.count(jax.make_jaxpr(make_denoiser(unet.module))(*args)).total
    expected = analytical.unet_forward_flops(dict(unet.config), 16).total
    assert counted == pytest.approx(expected, rel=0.01)


def test_pallas_kernels_are_counted_by_grid():
    """The flash-attention kernel's forward does what the formula does: QK^T and PV, 2 x 2 x B x H
    x N x N x d, whatever its tiling."""
    from agfsync_jax.models import attention

    b, n, h, d = 2, 512, 2, 16
    q = jnp.zeros((b, n, h, d))
    jaxpr = jax.make_jaxpr(lambda q: attention._flash_core(q, q, q, 0.25, mesh=None, platform="cpu"))(q)
    counted = flop_count.count(jaxpr)
    assert (counted.pallas, counted.dot) == (2 * 2 * b * h * n * n * d, 0)
