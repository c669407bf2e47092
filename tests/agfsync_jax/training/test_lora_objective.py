"""LoRA DPO objective on the tiny SD1.x UNet, float64: log 2 with non-zero adapter gradients at
initialisation (b = 0), and loss and every adapter gradient equal to an independent PyTorch
computation with a peft-wrapped diffusers UNet (reference = the same UNet with adapters
disabled), the Diffusion-DPO formula written out in torch."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from agfsync_jax import lora
from agfsync_jax.lora import files as lora_files, keys
from agfsync_jax.training import losses, noise as noise_lib
from agfsync_jax.models.denoiser import Conditioning, make_denoiser
from agfsync_jax.training.objective import objective

torch = pytest.importorskip("torch")

BETA = 5000.0
BATCH = 4
RANK, ALPHA = 4, 8.0
TIMESTEPS = np.array([20, 310, 640, 970], np.int32)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the "attention" group


@pytest.fixture(scope="module")
def setup(tiny_sd1_path, tiny_sd1):
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_path / "unet").double().eval()
    # diffusers' Flax GEGLU uses tanh-approximate GELU; the oracle does the same.
    for module in unet.modules():
        if isinstance(module, GEGLU):
            module.gelu = types.MethodType(lambda self, g: torch.nn.functional.gelu(g, approximate="tanh"), module)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:  # margins of order 1 at beta = 5000
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    layout = keys.unet_layout(tiny_sd1.unet.config)
    flat = {}
    params = dict(unet.named_parameters())
    modules = sorted({n.split(".lora_A.")[0] for n in params if ".lora_A." in n})
    assert modules == keys.select_modules(layout, ("attention",)) or set(modules) == set(
        keys.select_modules(layout, ("attention",)))
    for m in modules:
        down, up = (params[f"{m}.lora_{x}.default.weight"].detach().numpy() for x in "AB")
        a, b = keys.to_flax_pair(down, up, m, "peft")
        path = keys.check_module(layout, m, a.shape, b.shape, "peft")
        flat[path + (lora.adapters.A,)], flat[path + (lora.adapters.B,)] = a, b
    adapters = unflatten_dict(flat)
    base = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tiny_sd1.unet.params)

    rng = np.random.default_rng(0)
    latent = (BATCH, 4, 16, 16)
    inputs = {"winner": rng.standard_normal(latent), "loser": 0.5 * rng.standard_normal(latent) + 0.3,
              "noise": rng.standard_normal((1,) + latent), "embeds": rng.standard_normal((BATCH, 77, 32))}
    schedule = noise_lib.schedule_from_config(tiny_sd1.scheduler_config)
    denoiser = make_denoiser(tiny_sd1.unet.module.clone(dtype=jnp.float64), lora_scale=ALPHA / RANK)
    spec = losses.get_loss("dpo")

    def f(adapters, base, inputs):
        return objective(lora.WithAdapters(base, adapters), base, denoiser, spec, schedule, BETA,
                         {"winner": inputs["winner"], "loser": inputs["loser"]},
                         [Conditioning(jnp.asarray(inputs["embeds"]))], inputs["noise"], TIMESTEPS)
    return dict(unet=unet, adapters=adapters, base=base, inputs=inputs, config=tiny_sd1.unet.config,
                grad=jax.jit(jax.value_and_grad(f, has_aux=True)), scheduler_config=tiny_sd1.scheduler_config)


def test_loss_is_log2_at_initialisation_with_nonzero_adapter_gradients(setup, tiny_sd1):
    fresh = lora.init_adapters(tiny_sd1.unet.params, tiny_sd1.unet.config, RANK, ("attention",),
                               jax.random.PRNGKey(0))
    fresh = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), fresh)
    with jax.enable_x64(True):
        (loss, metrics), grads = setup["grad"](fresh, setup["base"], setup["inputs"])
    flat = flatten_dict(grads)
    norm_a = math.sqrt(sum(float(np.sum(np.square(v))) for k, v in flat.items() if k[-1] == lora.adapters.A))
    norm_b = math.sqrt(sum(float(np.sum(np.square(v))) for k, v in flat.items() if k[-1] == lora.adapters.B))
    print(f"init: loss {float(loss)!r} margin {float(metrics['reward_margin']):.2e} |dL/da| {norm_a} |dL/db| {norm_b}")
    assert loss.dtype == jnp.float64 and abs(float(loss) - math.log(2)) < 1e-9
    # b = 0: the adapted layers add exactly 0, so da gets no gradient and db does.
    assert norm_b > 1e-3 and norm_a == 0.0


def _torch_dpo(setup):
    from diffusers import DDPMScheduler

    unet = setup["unet"]
    unet.zero_grad()
    sched = DDPMScheduler.from_config(setup["scheduler_config"])
    t = torch.from_numpy(TIMESTEPS).long()
    eps = torch.from_numpy(setup["inputs"]["noise"][0])
    text = torch.from_numpy(setup["inputs"]["embeds"])

    def err(image):
        x = torch.from_numpy(setup["inputs"][image])
        return ((unet(sched.add_noise(x, eps, t), t, encoder_hidden_states=text).sample - eps) ** 2).mean(dim=(1, 2, 3))

    unet.disable_adapters()  # the reference: base with adapters off
    with torch.no_grad():
        ref_w, ref_l = err("winner"), err("loser")
    unet.enable_adapters()
    inside = -0.5 * BETA * ((err("winner") - ref_w) - (err("loser") - ref_l))
    loss = -torch.nn.functional.logsigmoid(inside).mean()
    loss.backward()
    grads = {n.replace(".default.weight", ".weight"): p.grad.numpy() for n, p in unet.named_parameters()
             if "lora_" in n}
    frozen_grads = [n for n, p in unet.named_parameters() if "lora_" not in n and p.grad is not None
                    and float(p.grad.abs().max()) > 0]
    return float(loss.detach()), float((inside > 0).double().mean()), grads, frozen_grads


def test_loss_and_adapter_gradients_match_pytorch_peft(setup):
    with jax.enable_x64(True):
        (loss, metrics), grads = setup["grad"](setup["adapters"], setup["base"], setup["inputs"])
    pt_loss, pt_acc, pt_grads, _ = _torch_dpo(setup)
    ours = lora_files.diffusers_state_dict(grads, setup["config"])  # same layout as peft's parameters
    assert set(ours) == set(pt_grads) and len(ours) == 2 * 32
    rel = max(float(np.abs(ours[k] - pt_grads[k]).max() / (np.abs(pt_grads[k]).max() + 1e-30)) for k in ours)
    norm_pt = math.sqrt(sum(float((g ** 2).sum()) for g in pt_grads.values()))
    print(f"jax loss {float(loss):.6f} acc {float(metrics['implicit_acc'])}; torch {pt_loss:.6f} {pt_acc}; "
          f"|g| torch {norm_pt:.4f}; max relative per-tensor gradient difference {rel:.2e}")
    assert abs(pt_loss - math.log(2)) > 1e-2 and 0 < pt_acc < 1  # not vacuous
    # The tolerances of test_objective.py (full UNet): the two UNets do not agree to float64 rounding.
    np.testing.assert_allclose(float(loss), pt_loss, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["implicit_acc"]), pt_acc)
    assert rel < 1e-3


@pytest.mark.parametrize("variant", [dict(remat_policy="nothing_saveable", remat_scope="layers"),
                                     dict(attention="fused")])
def test_adapters_act_under_per_layer_remat_and_fused_attention(setup, tiny_sd1, variant):
    """Remat lifts the "lora" collection into each checkpoint; the fused attention calls the
    same Dense layers: both give the plain loss and adapter gradients."""
    schedule = noise_lib.schedule_from_config(tiny_sd1.scheduler_config)
    denoiser = make_denoiser(tiny_sd1.unet.module.clone(dtype=jnp.float64), lora_scale=ALPHA / RANK, **variant)
    spec = losses.get_loss("dpo")

    def f(adapters, base, inputs):
        return objective(lora.WithAdapters(base, adapters), base, denoiser, spec, schedule, BETA,
                         {"winner": inputs["winner"], "loser": inputs["loser"]},
                         [Conditioning(jnp.asarray(inputs["embeds"]))], inputs["noise"], TIMESTEPS)
    with jax.enable_x64(True):
        (loss, _), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(setup["adapters"], setup["base"], setup["inputs"])
        (plain, _), plain_grads = setup["grad"](setup["adapters"], setup["base"], setup["inputs"])
    assert abs(float(plain) - math.log(2)) > 1e-2
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-9)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9 * float(np.abs(b).max()))
