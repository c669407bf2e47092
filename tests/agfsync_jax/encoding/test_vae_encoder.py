"""Our Flax VAE encoder (weights through the real loading path) against diffusers' PyTorch
AutoencoderKL, the UNet-space scaling, and the per-image posterior samples."""

from __future__ import annotations

import io
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agfsync_jax.encoding import preprocess, vae_encoder
from agfsync_jax.sampling import decode


def _images(n: int, size: int = 32) -> np.ndarray:
    """(n, 3, size, size) preprocessed photos-to-be: random PNGs of various aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24 + 9 * i, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(preprocess.preprocess(buf.getvalue(), size, f"image {i}"))
    return np.stack(out)


@pytest.fixture(scope="module")
def torch_vae(tiny_sd1_path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd1_path / "vae").eval()


def test_posterior_matches_diffusers_pytorch(tiny_sd1, torch_vae):
    import torch

    pixels = _images(3)
    mean, std = jax.jit(lambda p, x: vae_encoder.posterior(tiny_sd1.vae.module, p, x))(tiny_sd1.vae.params, pixels)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(pixels)).latent_dist
    assert mean.shape == (3, 4, 16, 16)
    print(f"max |mean diff| {np.abs(np.asarray(mean) - dist.mean.numpy()).max():.2e}, "
          f"max |std diff| {np.abs(np.asarray(std) - dist.std.numpy()).max():.2e}")
    np.testing.assert_allclose(np.asarray(mean), dist.mean.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(std), dist.std.numpy(), rtol=0, atol=1e-4)
    assert float(np.std(dist.mean.numpy())) > 1e-2  # not a trivially constant output


def test_mean_mode_is_the_scaled_posterior_mean(tiny_sd1, torch_vae):
    import torch

    pixels = _images(2)
    latents = vae_encoder.encode_latents(tiny_sd1.vae.module, tiny_sd1.vae.params, tiny_sd1.vae.config, pixels,
                                         np.zeros((2, 2), np.uint32), "mean")
    with torch.no_grad():
        reference = torch_vae.encode(torch.from_numpy(pixels)).latent_dist.mean * torch_vae.config.scaling_factor
    np.testing.assert_allclose(np.asarray(latents), reference.numpy(), rtol=0, atol=1e-4 * 0.18215 * 10)


def test_sample_mode_draws_one_key_per_image(tiny_sd1):
    vae = tiny_sd1.vae
    pixels = _images(3)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s, impl="threefry2x32"))) for s in (5, 6, 7)])
    encode = jax.jit(lambda x, k, mode: vae_encoder.encode_latents(vae.module, vae.params, vae.config, x, k, mode),
                     static_argnums=2)
    sampled, mean = np.asarray(encode(pixels, keys, "sample")), np.asarray(encode(pixels, keys, "mean"))
    _, std = vae_encoder.posterior(vae.module, vae.params, pixels)
    for i in range(3):
        eps = jax.random.normal(jax.random.wrap_key_data(keys[i], impl="threefry2x32"), (4, 16, 16), jnp.float32)
        np.testing.assert_allclose(sampled[i], mean[i] + 0.18215 * np.asarray(std[i] * eps), atol=1e-5)
    # An image's draw depends on its key only, not on the batch around it.
    alone = np.asarray(encode(pixels[1:2], keys[1:2], "sample"))
    np.testing.assert_allclose(alone[0], sampled[1], atol=1e-5)
    assert not np.allclose(sampled, mean, atol=1e-6)


def test_unet_space_inverts_the_decoder_input_rule():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    plain = {"scaling_factor": 0.18215}
    np.testing.assert_allclose(np.asarray(vae_encoder.to_unet_space(z, plain)), np.asarray(z) * 0.18215, rtol=1e-6)
    normalised = {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [2.0, 1.5, 0.5, 1.0]}
    ours = np.asarray(vae_encoder.to_unet_space(z, normalised))
    # diffusers' SDXL img2img pipeline: (latents - latents_mean) * scaling_factor / latents_std.
    m = np.reshape(normalised["latents_mean"], (1, 4, 1, 1))
    s = np.reshape(normalised["latents_std"], (1, 4, 1, 1))
    np.testing.assert_allclose(ours, (np.asarray(z) - m) * 0.5 / s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(decode.vae_input(jnp.asarray(ours), normalised)), np.asarray(z),
                               rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_refused(tiny_sd1):
    with pytest.raises(ValueError, match="encode.latent='mode'"):
        vae_encoder.encode_latents(tiny_sd1.vae.module, tiny_sd1.vae.params, tiny_sd1.vae.config,
                                   _images(1), np.zeros((1, 2), np.uint32), "mode")


@pytest.mark.slow  # a subprocess with 4 simulated devices: about a minute on 2 CPU cores
def test_program_on_four_devices_matches_one(tiny_sd1_path, run_python):
    """The mesh-sharded program (batch over 4 devices, FSDP parameters) gives one device's latents."""
    code = textwrap.dedent(f"""
        import jax, numpy as np, warnings
        warnings.filterwarnings("ignore")
        from agfsync_jax import sharding
        from agfsync_jax.encoding.program import EncodingProgram
        from agfsync_jax.models.loading import load_stable_diffusion
        from configs import common
        sd = load_stable_diffusion({str(tiny_sd1_path)!r}, components=("unet", "vae"))
        rng = np.random.default_rng(0)
        pixels = rng.uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)
        keys = rng.integers(0, 2**32, (8, 2), dtype=np.uint32)
        cfg = common.base_config().mesh
        out = {{}}
        for name, devices, fsdp in (("one", jax.devices()[:1], 1), ("four", jax.devices(), 2)):
            cfg.fsdp = fsdp
            mesh = sharding.make_mesh(cfg, devices)
            program = EncodingProgram(sd.vae, mesh, batch_size=8, resolution=32, mode="sample",
                                      param_mode="fsdp", min_shard_size=1024)
            latents = program(pixels, keys)
            out[name] = program.local_rows(latents)
            print(name, latents.sharding.spec, program.sharded_param_arrays)
        assert out["four"].shape == (8, 4, 16, 16)
        diff = float(np.abs(out["one"] - out["four"]).max())
        print("max diff", diff)
        assert diff < 1e-5, diff
    """)
    proc = run_python(code, devices=4)
    print(proc.stdout)
    assert "max diff" in proc.stdout
