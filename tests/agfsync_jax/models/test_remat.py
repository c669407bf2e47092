"""Per-layer / per-block remat of the Flax UNet changes what is recomputed, never the result:
same outputs and gradients as the plain UNet, one checkpoint per resnet/transformer (or block)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agfsync_jax.models.denoiser import Conditioning, make_denoiser


@pytest.mark.parametrize("family,scope,attention", [
    ("tiny_sd1", "layers", "diffusers"), ("tiny_sdxl", "blocks", "fused")])
@pytest.mark.slow
def test_per_module_remat_keeps_outputs_and_gradients(family, scope, attention, request, unet_inputs):
    sd = request.getfixturevalue(family)
    x, t, cond, target = unet_inputs(sd)

    def grads(denoiser):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.mean((denoiser(p, x, t, cond) - target) ** 2)))(sd.unet.params)

    plain = make_denoiser(sd.unet.module, attention=attention)
    remat = make_denoiser(sd.unet.module, "nothing_saveable", attention, remat_scope=scope)
    (l_plain, g_plain), (l_remat, g_remat) = grads(plain), grads(remat)
    np.testing.assert_allclose(l_remat, l_plain, rtol=1e-6)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(g_plain))
    assert diff <= 1e-5 * scale, (diff, scale)


def test_remat_scope_checkpoints_each_module(tiny_sd1):
    """'layers' puts every resnet and transformer under its own checkpoint; 'unet' one in all."""
    unet = tiny_sd1.unet
    args = (unet.params, jnp.zeros((1, 4, 16, 16)), jnp.zeros((1,), jnp.int32),
            Conditioning(jnp.zeros((1, 77, unet.config["cross_attention_dim"]))))

    def count(jaxpr) -> int:  # the checkpoint primitive prints as remat2 (older jax: checkpoint)
        return len(re.findall(r"= (?:remat2|checkpoint)\[", str(jaxpr)))

    def checkpoints(**kw):
        return count(jax.make_jaxpr(make_denoiser(unet.module, "nothing_saveable", **kw))(*args))

    layers = unet.config["layers_per_block"]
    n_down = len(unet.config["block_out_channels"])
    n_cross_down = sum("CrossAttn" in b for b in unet.config["down_block_types"])
    n_cross_up = sum("CrossAttn" in b for b in unet.config["up_block_types"])
    # resnets: layers per down block, layers+1 per up block, 2 in the mid block; transformers:
    # one per resnet of a cross-attention block and one in the mid block.
    expected = (n_down * layers + n_down * (layers + 1) + 2
                + n_cross_down * layers + n_cross_up * (layers + 1) + 1)
    assert checkpoints(remat_scope="layers") == expected
    assert checkpoints(remat_scope="blocks") == 2 * n_down + 1
    assert checkpoints(remat_scope="unet") == 1
    assert count(jax.make_jaxpr(make_denoiser(unet.module, remat_scope="layers"))(*args)) == 0
    with pytest.raises(ValueError, match="remat_scope"):
        make_denoiser(unet.module, "nothing_saveable", remat_scope="everything")
