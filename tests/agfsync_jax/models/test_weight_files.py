"""Weight files users actually have: damaged ones are named, variants and shards load.

Every folder here is written by diffusers' or transformers' own `save_pretrained` (variants,
shards) from the tiny pipeline, then damaged by hand where the test is about damage.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from agfsync_jax.models import loading, weight_files

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def _copy(src, dst):
    return shutil.copytree(src, dst)


def _assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


# --- damaged files -----------------------------------------------------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero(path):
    path.write_bytes(b"")


def _html(path):
    path.write_text("<!DOCTYPE html>\n<html><head><title>Access denied</title></head>"
                    "<body>Sign in to download this file.</body></html>\n")


def _lfs_pointer(path):
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4c2f5e1f0f0e5c2d3a8b4c2f5e1f0f0e5c2d3a8b4c2f5e1f0f0e5c2d3a8b4c2f\n"
                    "size 3438167536\n")


@pytest.mark.parametrize("damage, looks_like", [
    (_truncate, "is truncated"),
    (_zero, "is empty (zero bytes)"),
    (_html, "is an HTML page"),
    (_lfs_pointer, "run `git lfs pull`"),
])
def test_damaged_safetensors_is_named_with_component_and_what_it_looks_like(
        tiny_sd1_path, tmp_path, damage, looks_like):
    folder = _copy(tiny_sd1_path, tmp_path / "sd")
    damage(folder / UNET_FILE)
    with pytest.raises(loading.ModelFolderError) as e:
        loading.load_stable_diffusion(folder)
    msg = str(e.value)
    assert "component 'unet'" in msg and str(folder / UNET_FILE) in msg and looks_like in msg


@pytest.mark.parametrize("damage, looks_like", [
    (_truncate, "truncated"),
    (_zero, "is empty"),
    (_lfs_pointer, "git lfs pull"),
])
def test_damaged_bin_is_named_too(tiny_sd1_bin_path, tmp_path, damage, looks_like):
    folder = _copy(tiny_sd1_bin_path, tmp_path / "sd")
    path = folder / "text_encoder" / "pytorch_model.bin"
    damage(path)
    with pytest.raises(loading.ModelFolderError) as e:
        loading.load_stable_diffusion(folder)
    msg = str(e.value)
    assert "component 'text_encoder'" in msg and str(path) in msg and looks_like in msg


def test_a_header_that_lies_about_the_data_is_truncation(tiny_sd1_path, tmp_path):
    """The header is intact, the tensor data is cut short: what an interrupted copy leaves."""
    folder = _copy(tiny_sd1_path, tmp_path / "sd")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(loading.ModelFolderError, match=r"component 'vae'.*is truncated: \d+ of \d+"):
        loading.load_stable_diffusion(folder)


def test_non_finite_weights_fail_at_load_naming_the_tensor(tiny_sd1_path, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy(tiny_sd1_path, tmp_path / "sd")
    path = folder / UNET_FILE
    state = load_file(str(path))
    key = sorted(state)[3]
    state[key] = state[key].copy()
    state[key].flat[0] = np.nan
    state[key].flat[1] = np.inf
    save_file(state, str(path))
    with pytest.raises(loading.ModelFolderError) as e:
        loading.load_stable_diffusion(folder, components=("unet",))
    msg = str(e.value)
    assert "component 'unet'" in msg and repr(key) in msg and "1 NaN and 1 infinite" in msg


def test_finite_check_passes_large_finite_float16_weights():
    """The check sums in float64: large finite float16 values must not read as overflow."""
    big = np.full((1000, 1000), 65504.0, np.float16)  # float16's largest finite value
    weight_files.check_finite({"w": big}, weight_files.Path("x.safetensors"))


# --- variants and shards -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_only_sd1(tiny_sd1_path, tmp_path_factory):
    """The tiny SD1 folder saved by diffusers with variant="fp16" only (no plain files)."""
    import torch
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("variant") / "sd-fp16"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_path, torch_dtype=torch.float16)
    pipe.save_pretrained(out, variant="fp16")
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (out / UNET_FILE).exists()
    return out


def test_fp16_variant_only_folder_loads_like_diffusers_does(fp16_only_sd1):
    import torch
    from diffusers import UNet2DConditionModel

    sd = loading.load_stable_diffusion(fp16_only_sd1, variant="fp16")
    assert sd.vae is not None and len(sd.text_encoders) == 1
    leaves = jax.tree_util.tree_leaves(sd.unet.params)
    assert {x.dtype for x in leaves} == {np.dtype(np.float32)}  # float32 master weights
    # The oracle: diffusers' own loading of the same variant files, run in float32.
    pt = UNet2DConditionModel.from_pretrained(fp16_only_sd1 / "unet", variant="fp16").float().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    ours = sd.unet.module.apply({"params": sd.unet.params}, x, jax.numpy.asarray(t), ctx).sample
    with torch.no_grad():
        ref = pt(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample
    assert float(np.abs(np.asarray(ours) - ref.numpy()).max()) < 1e-4
    assert float(np.abs(ref.numpy()).max()) > 1e-2


def test_variant_only_folder_without_variant_names_the_fix(fp16_only_sd1):
    with pytest.raises(loading.ModelFolderError) as e:
        loading.load_stable_diffusion(fp16_only_sd1)
    msg = str(e.value)
    assert "component 'unet'" in msg and "'fp16'" in msg and "model.variant" in msg


def test_missing_variant_names_what_is_there(tiny_sd1_path):
    with pytest.raises(loading.ModelFolderError, match=r"no variant 'fp16' weights file.*'' \(none\)"):
        loading.load_stable_diffusion(tiny_sd1_path, variant="fp16")


@pytest.mark.parametrize("safe", [False, True])
def test_sharded_folders_load_the_same_parameters(tiny_sd1_path, tiny_sd1, tmp_path, safe):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sharded"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_path)
    pipe.save_pretrained(out, safe_serialization=safe, max_shard_size="100KB")
    ext = "safetensors" if safe else "bin"
    assert (out / "unet" / f"diffusion_pytorch_model.{ext}.index.json").is_file()
    assert (out / "text_encoder" / f"model.{ext}.index.json" if safe
            else out / "text_encoder" / "pytorch_model.bin.index.json").is_file()
    assert len(list((out / "unet").glob(f"*.{ext}"))) > 1
    sd = loading.load_stable_diffusion(out)
    _assert_same_params(sd.unet.params, tiny_sd1.unet.params)
    _assert_same_params(sd.vae.params, tiny_sd1.vae.params)
    _assert_same_params(sd.text_encoders[0].params, tiny_sd1.text_encoders[0].params)
