"""Single-file checkpoints: converted once through diffusers' own loader, then loaded like any folder.

The single files are made here from tiny diffusers pipelines in the original (LDM) layout.
diffusers' package ships only the LDM -> diffusers direction (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint` and
the `DIFFUSERS_TO_LDM_MAPPING` table); its diffusers -> LDM scripts are not in the package and
assume the full-size layouts. So `to_original_layout` below inverts that table and the
converters' renaming rules for any block count, and every test first checks that diffusers'
own converters map the file back to exactly the tensors it came from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from agfsync_jax.models import loading, single_file, weight_files

TOL = 1e-4


# --- diffusers -> original layout (the inverse of diffusers' converters) -----------------------

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
           ("conv_shortcut", "skip_connection"))


def _unet_prefixes(config) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a resnet) for every block of a UNet config."""
    lpb, n = config["layers_per_block"], len(config["block_out_channels"])
    out = []
    for b in range(n):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            out += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", True),
                    (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", False)]
        if b < n - 1:
            out.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.",
                        False))
    out += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
            ("mid_block.resnets.1.", "middle_block.2.", True)]
    for b in range(n):
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            out += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", True),
                    (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", False)]
        if b < n - 1:
            slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
            out.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.",
                        False))
    return out


def unet_to_ldm(state, config) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    static = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        static.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        if key in static:
            out[static[key]] = value
            continue
        prefix, ldm, resnet = next(p for p in prefixes if key.startswith(p[0]))
        rest = key[len(prefix):]
        if resnet:
            for ours, theirs in _RESNET:
                rest = rest.replace(ours, theirs)
        out[ldm + rest] = value
    return {"model.diffusion_model." + k: v for k, v in out.items()}


_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))


def vae_to_ldm(state, config) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    static = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n, lpb = len(config["down_block_types"]), config["layers_per_block"]
    prefixes = []
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(lpb)]
        prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        prefixes += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.")
                     for j in range(lpb + 1)]
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
    out = {}
    for key, value in state.items():
        if key in static:
            out[static[key]] = value
            continue
        if ".mid_block.attentions.0." in key:
            part, rest = key.split(".mid_block.attentions.0.")
            for ours, theirs in _VAE_ATTENTION:
                rest = rest.replace(ours, theirs)
            if rest.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]  # the original keeps these as 1x1 convolutions
            out[f"{part}.mid.attn_1.{rest}"] = value
            continue
        prefix, ldm = next(p for p in prefixes if key.startswith(p[0]))
        out[ldm + key[len(prefix):].replace("conv_shortcut", "nin_shortcut")] = value
    return {"first_stage_model." + k: v for k, v in out.items()}


_OPEN_CLIP = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
              ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def open_clip_to_ldm(state, prefix: str) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    static = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out, qkv = {}, {}
    for key, value in state.items():
        if key in static:
            out[static[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault((layer, rest.split(".")[-1]), {})[rest.split(".")[1][0]] = value
            continue
        for ours, theirs in _OPEN_CLIP:
            rest = rest.replace(ours, theirs)
        out[f"transformer.resblocks.{layer}.{rest}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return {prefix + k: v for k, v in out.items()}


def to_original_layout(pipe, family: str) -> dict:
    state = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
             **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)}
    clip = {k: v for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if family == "sd1":
        state.update({"cond_stage_model.transformer." + k: v for k, v in clip.items()})
    else:
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip.items()})
        clip2 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
        state.update(open_clip_to_ldm(clip2, "conditioner.embedders.1.model."))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def assert_diffusers_converts_back(ldm, pipe, family):
    """The oracle for the file: diffusers' own LDM -> diffusers converters give back every tensor."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                      convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    def same(converted, module):
        expected = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        assert sorted(converted) == sorted(expected)
        for k, v in expected.items():
            assert torch.equal(converted[k].reshape(v.shape), v), k

    same(convert_ldm_unet_checkpoint(ldm, pipe.unet.config), pipe.unet)
    same(convert_ldm_vae_checkpoint(ldm, pipe.vae.config), pipe.vae)
    same(convert_ldm_clip_checkpoint(ldm), pipe.text_encoder)
    if family == "sdxl":
        same(convert_open_clip_checkpoint(pipe.text_encoder_2, ldm, prefix="conditioner.embedders.1.model."),
             pipe.text_encoder_2)


# --- tiny pipelines and their single files -----------------------------------------------------

def _tiny_sdxl_with_distinct_encoder_widths():
    """The tiny SDXL pipeline, but with text_encoder_2 wider than text_encoder (48 vs 32).

    diffusers' single-file loader tells SDXL's two encoders apart by width (768 vs 1280 in the
    real model); with equal widths it would load CLIP-L's weights into both.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from agfsync_jax.tiny.pipeline import build_tiny_pipeline

    base = build_tiny_pipeline("sdxl", seed=0)
    cfg = base.text_encoder_2.config.to_dict()
    cfg.update(hidden_size=48, intermediate_size=96, projection_dim=48)
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    unet_cfg = dict(base.unet.config)
    unet_cfg.update(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 48)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    assert isinstance(base.text_encoder, CLIPTextModel)
    return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
                                     scheduler=base.scheduler, force_zeros_for_empty_prompt=True)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def single(request, tmp_path_factory):
    """(family, diffusers folder, config-only folder, single .safetensors file) of one family."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from agfsync_jax.tiny.build import save_tiny_pipeline

    family = request.param
    root = tmp_path_factory.mktemp(f"single-{family}")
    if family == "sd1":
        pipe = StableDiffusionPipeline.from_pretrained(save_tiny_pipeline("sd1", root / "tiny"))
    else:
        pipe = _tiny_sdxl_with_distinct_encoder_widths()
    folder = root / "diffusers"
    pipe.save_pretrained(folder)
    # The config folder has no weights: whatever loads must come from the single file.
    configs = shutil.copytree(folder, root / "configs",
                              ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    ldm = to_original_layout(pipe, family)
    assert_diffusers_converts_back(ldm, pipe, family)
    path = root / f"tiny-{family}.safetensors"
    save_file(ldm, str(path))
    return family, folder, configs, path


def _unet_inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, config["sample_size"], config["sample_size"])).astype(np.float32)
    t = np.array([10, 700][:batch], np.int32)
    ctx = rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(np.float32)
    added = None
    dims = loading.unet_added_cond_dims(config)
    if dims:
        added = {"text_embeds": rng.standard_normal((batch, dims[0])).astype(np.float32),
                 "time_ids": np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (batch, 1))}
    return x, t, ctx, added


def _assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


def test_single_file_converts_once_and_matches_diffusers(single, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family, folder, configs, path = single
    out = single_file.converted_folder(path, tmp_path / "cache", configs)
    assert json.loads((out / single_file.RECORD).read_text())["size"] == path.stat().st_size
    ours = loading.load_stable_diffusion(out)
    assert ours.family == family
    # The same parameters as the diffusers folder the file was made from ...
    reference = loading.load_stable_diffusion(folder)
    _assert_same_params(ours.unet.params, reference.unet.params)
    _assert_same_params(ours.vae.params, reference.vae.params)
    for a, b in zip(ours.text_encoders, reference.text_encoders, strict=True):
        _assert_same_params(a.params, b.params)

    # ... and the same UNet function as diffusers' own loading of the single file.
    cls = StableDiffusionPipeline if family == "sd1" else StableDiffusionXLPipeline
    pt = cls.from_single_file(str(path), config=str(configs), local_files_only=True).unet.eval()
    x, t, ctx, added = _unet_inputs(ours.unet.config)
    flax_out = jax.jit(lambda p, x, t, c, a: ours.unet.module.apply({"params": p}, x, t, c, a).sample)(
        ours.unet.params, x, t, ctx, added)
    with torch.no_grad():
        ref = pt(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                 added_cond_kwargs=None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
                 ).sample.numpy()
    assert float(np.abs(np.asarray(flax_out) - ref).max()) < TOL
    assert float(np.abs(ref).max()) > 100 * TOL


def test_conversion_is_cached_by_file_identity(single, tmp_path, monkeypatch):
    import diffusers

    family, _, configs, path = single
    copy = Path(shutil.copy(path, tmp_path / path.name))
    first = single_file.converted_folder(copy, tmp_path / "cache", configs)
    cls = diffusers.StableDiffusionPipeline if family == "sd1" else diffusers.StableDiffusionXLPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(cls, "from_single_file", refuse)
    assert single_file.converted_folder(copy, tmp_path / "cache", configs) == first  # cached
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # "a new download"
    with pytest.raises(AssertionError, match="converted again"):
        single_file.converted_folder(copy, tmp_path / "cache", configs)
    monkeypatch.undo()
    second = single_file.converted_folder(copy, tmp_path / "cache", configs)
    assert second != first and not list((tmp_path / "cache").glob(".*"))  # no staging left behind


def test_model_path_may_name_a_single_file(single, tmp_path):
    from configs.common import base_config

    from agfsync_jax.base_model import resolve_base_model

    family, _, configs, path = single
    config = base_config()
    config.model.path = str(path)
    config.model.single_file_config = str(configs)
    resolved = resolve_base_model(config, tmp_path / "wd")
    assert resolved.parent == tmp_path / "wd" / single_file.DEFAULT_CACHE
    assert loading.detect_family(resolved) == family


def test_damaged_single_file_is_named(single, tmp_path):
    _, _, configs, path = single
    pointer = tmp_path / path.name
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(weight_files.UnreadableWeightsError, match=f"{pointer}.*git lfs pull"):
        single_file.converted_folder(pointer, tmp_path / "cache", configs)


def test_without_local_configs_it_says_what_is_missing_and_downloads_nothing(single, tmp_path, monkeypatch):
    import huggingface_hub

    _, _, _, path = single
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(single_file.SingleFileError) as e:
        single_file.converted_folder(path, tmp_path / "cache")
    msg = str(e.value)
    assert str(path) in msg and "model.single_file_config" in msg and "huggingface-cli download" in msg
    assert not (tmp_path / "cache").exists()
