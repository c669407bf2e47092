"""Flax components loaded by our code vs the PyTorch modules they came from (the oracle)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agfsync_jax.models import loading
from agfsync_jax.models.text_encoding import encode_tokens, tokenize

TOL = 1e-4


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _unet_inputs(sd, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    c = sd.unet.config
    x = rng.standard_normal((batch, c["in_channels"], c["sample_size"], c["sample_size"])).astype(np.float32)
    t = np.array([10, 700][:batch], np.int32)
    ctx = rng.standard_normal((batch, 7, c["cross_attention_dim"])).astype(np.float32)
    added = None
    dims = loading.unet_added_cond_dims(c)
    if dims:
        added = {"text_embeds": rng.standard_normal((batch, dims[0])).astype(np.float32),
                 "time_ids": np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (batch, 1))}
    return x, t, ctx, added


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_matches_pytorch(family, request):
    from diffusers import UNet2DConditionModel

    path = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    x, t, ctx, added = _unet_inputs(sd)
    ours = jax.jit(lambda p, x, t, c, a: sd.unet.module.apply({"params": p}, x, t, c, a).sample)(
        sd.unet.params, x, t, ctx, added)
    pt = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    with torch.no_grad():
        ref = pt(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                 added_cond_kwargs=None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}).sample
    assert ours.shape == ref.shape
    diff = _max_diff(ours, ref.numpy())
    print(f"{family} UNet max abs diff vs PyTorch: {diff:.2e}")
    assert diff < TOL
    # The comparison is not vacuous: the output has signal well above the tolerance.
    assert float(np.abs(ref.numpy()).max()) > 100 * TOL


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_vae_decoder_matches_pytorch(family, request):
    from diffusers import AutoencoderKL

    path = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    z = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    ours = jax.jit(lambda p, z: sd.vae.module.apply({"params": p}, z, method=sd.vae.module.decode).sample)(
        sd.vae.params, z)
    pt = AutoencoderKL.from_pretrained(path / "vae").eval()
    with torch.no_grad():
        ref = pt.decode(torch.from_numpy(z)).sample.numpy()
    diff = _max_diff(ours, ref)
    print(f"{family} VAE decoder max abs diff vs PyTorch: {diff:.2e}")
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert diff < TOL


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoders_match_pytorch(family, request):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    prompts = ["a red cat sitting on a wooden table", "", "two blue birds above a snowy mountain at sunset"]
    ids = tokenize(sd.tokenizers, prompts)
    names = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for i, name in enumerate(names):
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        pt = cls.from_pretrained(path / name).eval()
        with torch.no_grad():
            ref = pt(torch.from_numpy(ids[i]).long(), output_hidden_states=True)
        ours = sd.text_encoders[i].module(ids[i], params=sd.text_encoders[i].params, output_hidden_states=True)
        assert _max_diff(ours.last_hidden_state, ref.last_hidden_state.numpy()) < TOL
        assert _max_diff(ours.hidden_states[-2], ref.hidden_states[-2].numpy()) < TOL
        if name == "text_encoder_2":
            assert _max_diff(ours.text_embeds, ref.text_embeds.numpy()) < TOL
    # The combined conditioning equals the diffusers pipeline's own encode_prompt.
    embeds = encode_tokens(sd.family, [e.module for e in sd.text_encoders],
                           [e.params for e in sd.text_encoders], jnp.asarray(ids))
    pipe = _pt_pipeline(family, path)
    with torch.no_grad():
        out = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert _max_diff(embeds.embeds, out[0].numpy()) < TOL
    if family == "sdxl":
        assert _max_diff(embeds.pooled, out[2].numpy()) < TOL


def _pt_pipeline(family, path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(path)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bin_folder_loads_the_same_parameters(family, request):
    """A `.bin` folder (upstream's only from_pt path) and a safetensors-only folder built from the
    same seed give bitwise-equal Flax parameters, so the PyTorch parity above holds for both."""
    sd_st = request.getfixturevalue(f"tiny_{family}")
    bin_path = request.getfixturevalue(f"tiny_{family}_bin_path")
    assert not list(bin_path.rglob("*.safetensors")) and list(bin_path.rglob("*.bin"))
    sd_bin = loading.load_stable_diffusion(bin_path)
    pairs = [(sd_st.unet.params, sd_bin.unet.params), (sd_st.vae.params, sd_bin.vae.params)]
    pairs += [(a.params, b.params) for a, b in zip(sd_st.text_encoders, sd_bin.text_encoders)]
    for a, b in pairs:
        la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
        assert [p for p, _ in la] == [p for p, _ in lb]
        for (p, x), (_, y) in zip(la, lb):
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


def test_bf16_compute_policy(tiny_sd1_path):
    from agfsync_jax.models.dtype_policy import DtypePolicy

    sd = loading.load_stable_diffusion(tiny_sd1_path, DtypePolicy(compute_dtype=jnp.bfloat16),
                                       components=("unet",))
    assert sd.vae is None and not sd.text_encoders
    assert {x.dtype for x in jax.tree_util.tree_leaves(sd.unet.params)} == {jnp.dtype(jnp.float32)}
    assert sd.unet.module.dtype == jnp.bfloat16


def test_missing_folder(tmp_path):
    with pytest.raises(loading.ModelFolderError, match="does not exist"):
        loading.load_stable_diffusion(tmp_path / "nope")


def test_missing_unet_names_folder_and_component(tiny_sd1_path, tmp_path):
    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_sd1_path, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(loading.ModelFolderError) as e:
        loading.load_stable_diffusion(broken)
    assert str(broken) in str(e.value) and "'unet'" in str(e.value) and "missing" in str(e.value)


def test_unet_of_wrong_class_names_folder_and_component(tiny_sd1_path, tmp_path):
    broken = tmp_path / "vae-as-unet"
    shutil.copytree(tiny_sd1_path, broken)
    shutil.rmtree(broken / "unet")
    shutil.copytree(tiny_sd1_path / "vae", broken / "unet")
    with pytest.raises(loading.ModelFolderError) as e:
        loading.load_stable_diffusion(broken)
    msg = str(e.value)
    assert str(broken) in msg and "'unet'" in msg and "AutoencoderKL" in msg and "UNet2DConditionModel" in msg


def test_missing_weights_and_mismatched_weights(tiny_sd1_path, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_sd1_path, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(loading.ModelFolderError, match="'vae'.*no weights file"):
        loading.load_stable_diffusion(broken)
    # A config that disagrees with the weights is an error, never random weights.
    shutil.copy(tiny_sd1_path / "vae" / "diffusion_pytorch_model.safetensors", broken / "vae")
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'unet'.*missing parameters"):
        loading.load_stable_diffusion(broken)


def test_not_a_pipeline_folder(tiny_sd1_path, tmp_path):
    broken = tmp_path / "weird"
    shutil.copytree(tiny_sd1_path, broken)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(loading.ModelFolderError, match="KandinskyPipeline"):
        loading.detect_family(broken)


def test_guidance_embedding_unet_is_refused_naming_the_field(tiny_sd1_path, tmp_path):
    """An LCM-distilled UNet (time_cond_proj_dim: the guidance scale enters the timestep
    embedding) has weights and an input that diffusers' Flax UNet lacks: refused, not run without."""
    from diffusers import UNet2DConditionModel

    lcm = tmp_path / "lcm-unet"
    shutil.copytree(tiny_sd1_path, lcm)
    cfg = {k: v for k, v in json.loads((lcm / "unet" / "config.json").read_text()).items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**{**cfg, "time_cond_proj_dim": 16})
    assert any("cond_proj" in k for k in unet.state_dict())
    shutil.rmtree(lcm / "unet")
    unet.save_pretrained(lcm / "unet", safe_serialization=True)
    with pytest.raises(loading.ModelFolderError) as e:
        loading.load_stable_diffusion(lcm)
    msg = str(e.value)
    assert "time_cond_proj_dim=16" in msg and str(lcm / "unet" / "config.json") in msg and "LCM-LoRA" in msg


def test_abstract_model_has_the_loaded_models_shapes(tiny_sd1_path, tiny_sdxl_path):
    """`abstract_stable_diffusion` (configs only) builds exactly the trees the real loader fills."""
    import jax

    from agfsync_jax.models.loading import abstract_stable_diffusion, load_stable_diffusion

    for path in (tiny_sd1_path, tiny_sdxl_path):
        real, abstract = load_stable_diffusion(path), abstract_stable_diffusion(path)
        for r, a in zip([real.unet, real.vae, *real.text_encoders], [abstract.unet, abstract.vae, *abstract.text_encoders]):
            shapes = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), r.params)
            assert jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), a.params) == shapes
        assert [t.model_max_length for t in abstract.tokenizers] == [t.model_max_length for t in real.tokenizers]
        assert (abstract.family, abstract.force_zeros_for_empty_prompt) == (real.family, real.force_zeros_for_empty_prompt)


@pytest.mark.parametrize("name, unet_params, text_params", [
    # The published parameter counts of runwayml/stable-diffusion-v1-5 and
    # stabilityai/stable-diffusion-xl-base-1.0 (UNet; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers).
    ("sd15", 859_520_964, [123_060_480]),
    ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),
])
def test_shipped_architectures_are_the_real_models(name, unet_params, text_params):
    import jax
    import numpy as np

    from agfsync_jax.models.loading import abstract_stable_diffusion
    from agfsync_jax.plan.compile_plan import architecture_folder

    sd = abstract_stable_diffusion(architecture_folder(name))

    def count(tree):
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
    assert count(sd.unet.params) == unet_params
    assert [count(c.params) for c in sd.text_encoders] == text_params
    assert count(sd.vae.params) == 83_653_863
