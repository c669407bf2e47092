"""Mesh construction, FSDP partition rules, and a sharded UNet forward on 8 simulated devices."""

from __future__ import annotations

import textwrap

import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from agfsync_jax import sharding


def test_fsdp_spec_shards_largest_divisible_dim():
    assert sharding.fsdp_spec((3, 3, 320, 640), 4, 1024) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((1280, 320), 4, 1024) == P("fsdp", None)
    # 1285 is not divisible by 4: fall back to the next largest divisible dim.
    assert sharding.fsdp_spec((1285, 320), 4, 1024) == P(None, "fsdp")
    assert sharding.fsdp_spec((7, 9, 11, 13), 4, 1) == P()  # nothing divisible: replicate
    assert sharding.fsdp_spec((320,), 4, 1024) == P()  # small: replicate
    assert sharding.fsdp_spec((1280, 320), 1, 0) == P()  # no fsdp axis


def test_make_mesh_rejects_bad_shapes():
    import jax

    n = len(jax.devices())
    cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    assert sharding.make_mesh(cfg).shape == {"data": n, "fsdp": 1}
    with pytest.raises(ValueError, match="fsdp"):
        sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": n + 1}))
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(ml_collections.ConfigDict({"data": n + 1, "fsdp": 1}))


@pytest.mark.slow
def test_fsdp_unet_forward_on_8_devices_equals_single_device(run_python, tiny_sd1_path):
    code = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np, ml_collections
        from agfsync_jax import sharding
        from agfsync_jax.models.loading import load_stable_diffusion
        assert jax.device_count() == 8, jax.devices()
        sd = load_stable_diffusion({str(tiny_sd1_path)!r}, components=("unet",))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((8, 4, 16, 16)).astype(np.float32)
        t = np.arange(8, dtype=np.int32) * 100
        ctx = rng.standard_normal((8, 77, 32)).astype(np.float32)
        fwd = lambda p, x, t, c: sd.unet.module.apply({{"params": p}}, x, t, c).sample
        single = np.asarray(jax.jit(fwd)(sd.unet.params, x, t, ctx))

        mesh = sharding.make_mesh(ml_collections.ConfigDict({{"data": 2, "fsdp": 4}}))
        shardings = sharding.param_shardings(sd.unet.params, mesh, "fsdp", min_shard_size=1024)
        params = sharding.place_tree(sd.unet.params, shardings)
        batch = sharding.place_batch({{"x": x, "t": t, "ctx": ctx}}, mesh)
        out_sharding = sharding.batch_sharding(mesh)
        sharded_fwd = jax.jit(fwd, in_shardings=(shardings, out_sharding, out_sharding, out_sharding),
                              out_shardings=out_sharding)
        out = sharded_fwd(params, batch["x"], batch["t"], batch["ctx"])
        leaves = jax.tree_util.tree_leaves_with_path(params)
        path, big = max(leaves, key=lambda kv: kv[1].size)
        n_sharded = sum(1 for _, v in leaves if v.sharding.spec != jax.sharding.PartitionSpec())
        print("largest kernel", jax.tree_util.keystr(path), sharding.describe(big))
        print("sharded leaves", n_sharded, "of", len(leaves))
        print("output", sharding.describe(out))
        assert big.sharding.spec != jax.sharding.PartitionSpec(), "largest kernel is not sharded"
        assert len(big.addressable_shards) == 8 and big.addressable_shards[0].data.size == big.size // 4
        diff = float(np.max(np.abs(np.asarray(out) - single)))
        print("max abs diff sharded vs single", diff)
        assert diff < 1e-5, diff
    """)
    proc = run_python(code, devices=8)
    print(proc.stdout)
    assert "largest kernel" in proc.stdout
