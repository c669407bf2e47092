"""LoRA files made by peft/diffusers' own saving code, read by diffusers' `load_lora_weights`
(+ `fuse_lora`) in PyTorch and by `agfsync_jax.lora` into the Flax UNet: same outputs, tiny SD1.x
and SDXL, float32; kohya/A1111 files (renamed from the peft one by kohya's convention) too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agfsync_jax import lora
from agfsync_jax.lora import keys

from .conftest import ALPHA, flax_unet_out, peft_lora_unet, save_peft_lora, torch_unet_out, unet_inputs

KOHYA_ALPHA = 2.0


def _pipeline(family, folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(folder)


def _kohya_file(peft_file, out):
    """kohya/A1111 layout: lora_unet_<module with _>.lora_down/lora_up.weight + .alpha."""
    import safetensors.torch

    state = safetensors.torch.load_file(str(peft_file))
    kohya = {}
    for key, value in state.items():
        module, _, tail = key.removeprefix("unet.").partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        if tail.startswith("A"):
            kohya[f"{name}.lora_down.weight"] = value
            kohya[f"{name}.alpha"] = torch.tensor(KOHYA_ALPHA)
        else:
            kohya[f"{name}.lora_up.weight"] = value
    out.mkdir()
    safetensors.torch.save_file(kohya, str(out / "my_kohya_lora.safetensors"))
    return out / "my_kohya_lora.safetensors"


@pytest.fixture(params=["sd1", "sdxl"])
def case(request, tmp_path):
    family = request.param
    folder = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    unet = peft_lora_unet(folder)
    peft_dir = save_peft_lora(unet, tmp_path / "peft", family)
    return dict(family=family, folder=folder, sd=sd, peft_dir=peft_dir, inputs=unet_inputs(sd.unet.config),
                adapted_unet=unet, tmp=tmp_path)


def _diffusers_out(case, path, fuse, **kwargs):
    pipe = _pipeline(case["family"], case["folder"])
    pipe.load_lora_weights(path, **kwargs)
    if fuse:
        pipe.fuse_lora()
    return torch_unet_out(pipe.unet, case["inputs"])


def test_peft_lora_merged_and_on_the_fly_match_diffusers(case):
    sd, inputs = case["sd"], case["inputs"]
    weights = lora.load_lora(case["peft_dir"], sd.unet.config)
    peft_layers = sum(1 for name, _ in case["adapted_unet"].named_parameters() if ".lora_A." in name)
    assert weights.num_modules == peft_layers > 30  # every adapted layer, none dropped
    oracle = _diffusers_out(case, case["peft_dir"], fuse=True)
    unfused = _diffusers_out(case, case["peft_dir"], fuse=False)
    base = flax_unet_out(sd.unet.module, {"params": sd.unet.params}, inputs)
    merged = flax_unet_out(sd.unet.module, {"params": lora.merge_lora(sd.unet.params, weights)}, inputs)
    on_the_fly = flax_unet_out(sd.unet.module, lora.variables(lora.WithAdapters(sd.unet.params, weights.adapters)),
                               inputs, scale=1.0)
    diffs = {name: float(np.abs(x - oracle).max()) for name, x in
             [("merged", merged), ("adapters", on_the_fly), ("diffusers unfused", unfused)]}
    effect = float(np.abs(base - oracle).max())
    print(f"{case['family']}: {weights.num_modules} modules; max |ours - diffusers fused| {diffs}; LoRA effect {effect:.3f}")
    assert effect > 1e-1  # the LoRA changes the output, or the comparison says nothing
    assert max(diffs.values()) < 1e-4
    # The same file as peft's own adapted model (no save/load in between).
    np.testing.assert_allclose(torch_unet_out(case["adapted_unet"], inputs), oracle, atol=1e-4)


def test_older_diffusers_layout_of_attention_lora_matches_diffusers(case):
    sd = case["sd"]
    unet = peft_lora_unet(case["folder"], seed=3, targets=["to_q", "to_k", "to_v", "to_out.0"])
    old = save_peft_lora(unet, case["tmp"] / "old", case["family"], old_layout=True)
    import safetensors.torch

    names = list(safetensors.torch.load_file(str(old / lora.files.WEIGHT_NAME)))
    assert all(".lora.down.weight" in k or ".lora.up.weight" in k for k in names), names[:4]
    ours = flax_unet_out(sd.unet.module, {"params": lora.merge_lora(sd.unet.params, lora.load_lora(old, sd.unet.config))},
                         case["inputs"])
    oracle = _diffusers_out(case, old, fuse=True)
    assert float(np.abs(ours - oracle).max()) < 1e-4
    assert float(np.abs(ours - torch_unet_out(unet, case["inputs"])).max()) < 1e-4


def test_file_without_metadata_uses_alpha_equal_rank_like_diffusers(case):
    sd = case["sd"]
    plain = save_peft_lora(case["adapted_unet"], case["tmp"] / "plain", case["family"], with_metadata=False)
    ours = flax_unet_out(sd.unet.module, {"params": lora.merge_lora(sd.unet.params, lora.load_lora(plain, sd.unet.config))},
                         case["inputs"])
    oracle = _diffusers_out(case, plain, fuse=True)
    with_alpha = _diffusers_out(case, case["peft_dir"], fuse=True)
    assert float(np.abs(ours - oracle).max()) < 1e-4
    assert float(np.abs(with_alpha - oracle).max()) > 1e-2  # ALPHA != RANK: the metadata mattered


def test_kohya_layout_matches_diffusers(case):
    sd = case["sd"]
    file = _kohya_file(case["peft_dir"] / lora.files.WEIGHT_NAME, case["tmp"] / "kohya")
    weights = lora.load_lora(file, sd.unet.config)
    ours = flax_unet_out(sd.unet.module, {"params": lora.merge_lora(sd.unet.params, weights, scale=0.7)},
                         case["inputs"])
    pipe = _pipeline(case["family"], case["folder"])
    pipe.load_lora_weights(file.parent, weight_name=file.name)
    pipe.fuse_lora(lora_scale=0.7)
    oracle = torch_unet_out(pipe.unet, case["inputs"])
    # kohya's alpha (2 with rank 4) scales every module by 0.5; at scale 0.7 the effect is 0.35x.
    peft_scaled = flax_unet_out(sd.unet.module, {"params": lora.merge_lora(
        sd.unet.params, lora.load_lora(case["peft_dir"], sd.unet.config), scale=0.7 * (KOHYA_ALPHA / ALPHA))},
        case["inputs"])
    diff = float(np.abs(ours - oracle).max())
    print(f"{case['family']}: kohya file, max |ours - diffusers| {diff:.2e}")
    assert diff < 1e-4
    np.testing.assert_allclose(ours, peft_scaled, atol=1e-4)


def test_unknown_or_unmatched_keys_name_the_file_and_key(tiny_sd1, tiny_sdxl, tmp_path):
    import safetensors.torch

    def write(name, state):
        path = tmp_path / name
        safetensors.torch.save_file(state, str(path))
        return path

    good = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

    def a():
        return torch.zeros(4, 32)

    def b():
        return torch.zeros(32, 4)
    cases = {
        "no_such_layer.safetensors": ({"unet.down_blocks.7.attn1.to_q.lora_A.weight": a(),
                                       "unet.down_blocks.7.attn1.to_q.lora_B.weight": b()}, "down_blocks.7.attn1.to_q"),
        "text_encoder.safetensors": ({f"{good}.lora_A.weight": a(), f"{good}.lora_B.weight": b(),
                                      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a(),
                                      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": b()},
                                     "text_encoder"),
        "unpaired.safetensors": ({f"{good}.lora_A.weight": a()}, "to_q.lora_A.weight"),
        "bias.safetensors": ({f"{good}.lora_A.weight": a(), f"{good}.lora_B.weight": b(),
                              f"{good}.lora_B.bias": torch.zeros(32)}, "lora_B.bias"),
        "dora.safetensors": ({f"{good}.lora_A.weight": a(), f"{good}.lora_B.weight": b(),
                              f"{good}.lora_magnitude_vector": torch.zeros(32)}, "DoRA"),
        "kohya_leftover.safetensors": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
                                        "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1),
                                        "lora_unet_conv_in.mystery": torch.zeros(1)}, "mystery"),
    }
    for name, (state, needle) in cases.items():
        path = write(name, state)
        with pytest.raises(lora.LoraKeyError) as e:
            lora.load_lora(path, tiny_sd1.unet.config)
        print(e.value)
        assert name in str(e.value) and needle in str(e.value)
    # An SD1.x LoRA on the SDXL UNet: the layer exists, the shapes do not fit.
    path = write("sd1_on_sdxl.safetensors", {f"{good}.lora_A.weight": a(), f"{good}.lora_B.weight": b()})
    with pytest.raises(lora.LoraKeyError, match="sd1_on_sdxl.*do not fit|sd1_on_sdxl.*names no"):
        lora.load_lora(path, tiny_sdxl.unet.config)


def test_target_groups_cover_the_layers_they_name(tiny_sd1):
    layout = keys.unet_layout(tiny_sd1.unet.config)
    attention = keys.select_modules(layout, ("attention",))
    assert attention and all(m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for m in attention)
    assert len(attention) == 8 * sum(1 for m in layout.pt_shape if m.endswith("attn1.to_q")) > 0
    both = keys.select_modules(layout, ("attention", "feed_forward", "resnet_convs"))
    assert set(attention) < set(both) and any(m.endswith("ff.net.2") for m in both)
    assert any(m.endswith("resnets.0.conv1") for m in both)
    with pytest.raises(ValueError, match="train.lora.targets"):
        keys.parse_targets("attention,mlp")
