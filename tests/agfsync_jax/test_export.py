"""Export to diffusers: the folder loads in PyTorch, generates, and its UNet equals ours."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from agfsync_jax.export import pipeline_export as export
from agfsync_jax.models import loading
from agfsync_jax.models.weight_conversion import ParameterMismatchError


def _perturbed(params, seed=0, scale=0.01):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_exported_pipeline_loads_generates_and_matches_flax(family, request, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base = request.getfixturevalue(f"tiny_{family}_path")
    sd = request.getfixturevalue(f"tiny_{family}")
    params = _perturbed(sd.unet.params)
    out = export.export_pipeline(base, params, tmp_path / "export")
    assert (out / "unet" / export.UNET_WEIGHTS).is_file() and not list(out.rglob("*.bin"))
    # Loading the export back through our loader gives the exported parameters bitwise.
    reloaded = loading.load_stable_diffusion(out, components=("unet",)).unet.params
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(reloaded)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(out)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    images = pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    rng = np.random.default_rng(1)
    c = sd.unet.config
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([5, 800], np.int32)
    ctx = rng.standard_normal((2, 7, c["cross_attention_dim"])).astype(np.float32)
    dims = loading.unet_added_cond_dims(c)
    added = None if dims is None else {
        "text_embeds": rng.standard_normal((2, dims[0])).astype(np.float32),
        "time_ids": np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (2, 1))}
    # Arguments go through jit: the Flax UNet wraps a non-jax `timesteps` in an extra dimension.
    flax_out = np.asarray(jax.jit(
        lambda p, x, t, ctx, added: sd.unet.module.apply({"params": p}, x, t, ctx, added).sample)(
            params, x, t, ctx, added))
    pt_added = None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        exported = pipe.unet(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                             added_cond_kwargs=pt_added).sample.numpy()
        base_unet = cls.from_pretrained(base).unet
        base_out = base_unet(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(ctx),
                             added_cond_kwargs=pt_added).sample.numpy()
    diff = float(np.abs(exported - flax_out).max())
    print(f"{family}: exported UNet vs Flax max abs diff {diff:.2e}; vs base {np.abs(exported - base_out).max():.2e}")
    assert diff < 1e-4
    assert float(np.abs(exported - base_out).max()) > 1e-2


def test_export_refuses_missing_or_unexpected_parameters(tiny_sd1_path, tiny_sd1, tmp_path):
    params = jax.tree_util.tree_map(np.asarray, tiny_sd1.unet.params)
    missing = {k: v for k, v in params.items() if k != "conv_out"}
    with pytest.raises(ParameterMismatchError, match="conv_out"):
        export.export_pipeline(tiny_sd1_path, missing, tmp_path / "a")
    extra = dict(params, surprise={"kernel": np.zeros((3, 3))})
    with pytest.raises(ParameterMismatchError, match="surprise"):
        export.export_pipeline(tiny_sd1_path, extra, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_flax_msgpack_export_round_trips(tiny_sd1_path, tiny_sd1, tmp_path):
    from diffusers import FlaxUNet2DConditionModel

    out = export.export_flax_msgpack(tiny_sd1_path, tiny_sd1.unet.params, tmp_path / "flax-unet")
    _, loaded = FlaxUNet2DConditionModel.from_pretrained(out, _do_init=False)
    flat_a = jax.tree_util.tree_leaves(tiny_sd1.unet.params)
    flat_b = jax.tree_util.tree_leaves(loaded)
    assert len(flat_a) == len(flat_b)
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_array_equal(a, b)


def test_export_copies_only_the_pipeline_components(tiny_sd1_path, tiny_sd1, tmp_path):
    """A Hub snapshot holds more than the pipeline: an original checkpoint at the root, docs,
    folders the pipeline does not name, Flax and fp16 copies of the weights. None of it is copied."""
    import json
    import shutil

    from diffusers import StableDiffusionPipeline

    base = shutil.copytree(tiny_sd1_path, tmp_path / "snapshot")
    (base / "v1-5-pruned.safetensors").write_bytes(b"\0" * 4096)  # stands in for a multi-GB file
    (base / "README.md").write_text("model card")
    (base / ".gitattributes").write_text("*.safetensors filter=lfs")
    (base / "original").mkdir()
    (base / "original" / "config.yaml").write_text("model: {}")
    (base / "vae" / "diffusion_flax_model.msgpack").write_bytes(b"\0" * 64)
    shutil.copy(base / "text_encoder" / "model.safetensors", base / "text_encoder" / "model.fp16.safetensors")
    index = json.loads((base / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]  # named, not there
    (base / "model_index.json").write_text(json.dumps(index))

    out = export.export_pipeline(base, tiny_sd1.unet.params, tmp_path / "export")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
         "text_encoder/model.safetensors", "unet/config.json", f"unet/{export.UNET_WEIGHTS}",
         "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
        + [f"tokenizer/{p.name}" for p in (base / "tokenizer").iterdir()])
    exported_index = json.loads((out / "model_index.json").read_text())
    assert exported_index["safety_checker"] == [None, None]
    StableDiffusionPipeline.from_pretrained(out)  # whole as far as diffusers is concerned

    shutil.rmtree(base / "scheduler")
    with pytest.raises(FileNotFoundError, match=r"components \['scheduler'\]"):
        export.export_pipeline(base, tiny_sd1.unet.params, tmp_path / "export2")
    assert not (tmp_path / "export2").exists()


def test_export_of_a_variant_base_loads_without_the_variant(tiny_sd1_path, tiny_sd1, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    base = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(tiny_sd1_path, torch_dtype=torch.float16).save_pretrained(
        base, variant="fp16")
    out = export.export_pipeline(base, tiny_sd1.unet.params, tmp_path / "export", variant="fp16")
    assert not list(out.rglob("*.fp16.*"))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    reference = AutoencoderKL.from_pretrained(base / "vae", variant="fp16")
    for (k, a), b in zip(pipe.vae.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a.float(), b.float()), k


def test_export_refuses_a_component_without_the_variant(tiny_sd1_path, tiny_sd1, tmp_path):
    import shutil

    base = shutil.copytree(tiny_sd1_path, tmp_path / "plain")  # plain files only, no fp16
    with pytest.raises(FileNotFoundError, match=r"text_encoder: no variant 'fp16' weights file"):
        export.export_pipeline(base, tiny_sd1.unet.params, tmp_path / "export", variant="fp16")
    assert not (tmp_path / "export").exists()
