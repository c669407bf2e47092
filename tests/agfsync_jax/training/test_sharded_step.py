"""The train step on 8 simulated CPU devices with FSDP (and gradient accumulation) equals the
plain step on 1 device."""

from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.slow  # subprocesses and compilation: minutes on 2 CPU cores


def test_fsdp_step_on_8_devices_equals_single_device(run_python, micro_sd1_path):
    code = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np
        # float64: beta = 5000 turns float32 rounding (which differs between any two compiled
        # programs) into ~1e-5 of the loss; in float64 a sharding bug is all that could differ.
        jax.config.update("jax_enable_x64", True)
        from configs import tiny
        from agfsync_jax import sharding
        from agfsync_jax.models.dtype_policy import DtypePolicy
        from agfsync_jax.models.loading import load_stable_diffusion
        from agfsync_jax.training.train import build_training
        assert jax.device_count() == 8, jax.devices()

        sd = load_stable_diffusion({str(micro_sd1_path)!r}, DtypePolicy(jnp.float64, jnp.float64),
                                   components=("unet", "text_encoders"))
        rng = np.random.default_rng(0)
        B = 16
        raw = {{"winner_latent": rng.standard_normal((B, 4, 16, 16)).astype(np.float32),
               "loser_latent": rng.standard_normal((B, 4, 16, 16)).astype(np.float32),
               "prompt": np.array([f"a red cat {{i}}" for i in range(B)], object),
               "prompt_2": np.array([""] * B, object), "prompt_id": np.arange(B).astype(str).astype(object),
               "is_cross": np.zeros(B, bool)}}

        def config(fsdp, accum):
            c = tiny.get_config()
            c.train.batch_size, c.train.text_encoding, c.train.grad_accum_steps = B, "cached", accum
            c.mesh.fsdp, c.mesh.min_shard_size = fsdp, 1024  # the tiny model's kernels are small
            return c

        def two_steps(cfg, devices):
            # The second step's loss is the informative one: at the first, policy == reference.
            mesh = sharding.make_mesh(cfg.mesh, devices)
            setup = build_training(cfg, sd, mesh)
            state = setup.initial_state(seed=0)
            before = jax.device_get(state.params)
            batch = sharding.place_batch(setup.inputs(raw), mesh)
            state, _ = setup.train_step(state, setup.frozen, batch)
            state, metrics = setup.train_step(state, setup.frozen, batch)
            return before, state, jax.device_get(metrics), mesh

        # Reference: 1 device, the whole batch at once.
        before, single, m1, _ = two_steps(config(1, 1), jax.devices()[:1])
        # 8 devices, FSDP over all 8, two accumulated microbatches.
        _, sharded, m8, mesh = two_steps(config(8, 2), jax.devices())
        assert dict(mesh.shape) == {{"data": 1, "fsdp": 8}}

        leaves = jax.tree_util.tree_leaves_with_path(sharded.params)
        path, big = max(leaves, key=lambda kv: kv[1].size)
        name = jax.tree_util.keystr(path)
        print("largest kernel", name, sharding.describe(big))
        opt_leaves = jax.tree_util.tree_leaves_with_path(sharded.opt_state)
        moments = [(jax.tree_util.keystr(p), x) for p, x in opt_leaves if jax.tree_util.keystr(p).endswith(name)]
        for p, x in moments:
            print("adam state", p, sharding.describe(x))
        assert len(moments) == 2 and all(x.sharding.spec == big.sharding.spec for _, x in moments)
        assert big.sharding.spec != jax.sharding.PartitionSpec() and big.addressable_shards[0].data.size == big.size // 8

        print("second-step loss 1 device", m1["loss"], "8 devices", m8["loss"])
        assert m1["loss"].dtype == np.float64 and abs(float(m1["loss"]) - np.log(2)) > 1e-3  # the policy moved
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
        p1, p8 = jax.device_get(single.params), jax.device_get(sharded.params)
        def max_diff(x, y):
            return max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))
        diff, moved = max_diff(p1, p8), max_diff(p1, before)
        print("max |params 8 dev - 1 dev|", diff, "update size", moved)
        assert moved > 1e-5 and diff < 1e-5, (diff, moved)
    """)
    proc = run_python(code, devices=8)
    print(proc.stdout)
    assert "adam state" in proc.stdout


def test_lora_fsdp_step_on_8_devices_equals_single_device(run_python, micro_sd1_path):
    """The frozen base keeps the FSDP layout of full training; adapters follow the same rules."""
    code = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)  # as above: only a sharding bug could differ
        from configs import tiny
        from agfsync_jax import sharding
        from agfsync_jax.models.dtype_policy import DtypePolicy
        from agfsync_jax.models.loading import load_stable_diffusion
        from agfsync_jax.training.train import build_training

        sd = load_stable_diffusion({str(micro_sd1_path)!r}, DtypePolicy(jnp.float64, jnp.float64),
                                   components=("unet", "text_encoders"))
        rng = np.random.default_rng(0)
        B = 16
        raw = {{"winner_latent": rng.standard_normal((B, 4, 16, 16)).astype(np.float32),
               "loser_latent": rng.standard_normal((B, 4, 16, 16)).astype(np.float32),
               "prompt": np.array([f"a red cat {{i}}" for i in range(B)], object),
               "prompt_2": np.array([""] * B, object), "prompt_id": np.arange(B).astype(str).astype(object),
               "is_cross": np.zeros(B, bool)}}

        def two_steps(fsdp, accum, devices):
            c = tiny.get_config()
            c.train.batch_size, c.train.text_encoding, c.train.grad_accum_steps = B, "cached", accum
            c.mesh.fsdp, c.mesh.min_shard_size = fsdp, 128
            c.train.lora.rank, c.train.lora.targets = 8, "attention,resnet_convs"
            mesh = sharding.make_mesh(c.mesh, devices)
            setup = build_training(c, sd, mesh)
            state = setup.initial_state(seed=0)
            batch = sharding.place_batch(setup.inputs(raw), mesh)
            state, _ = setup.train_step(state, setup.frozen, batch)
            state, metrics = setup.train_step(state, setup.frozen, batch)
            return setup, state, jax.device_get(metrics)

        _, single, m1 = two_steps(1, 1, jax.devices()[:1])
        setup, sharded, m8 = two_steps(8, 2, jax.devices())
        base = jax.tree_util.tree_leaves_with_path(setup.frozen.base_params)
        path, big = max(base, key=lambda kv: kv[1].size)
        print("largest base kernel", jax.tree_util.keystr(path), sharding.describe(big))
        assert big.addressable_shards[0].data.size == big.size // 8
        specs = [(x.shape, x.sharding.spec) for x in jax.tree_util.tree_leaves(sharded.params)]
        assert all(spec == sharding.fsdp_spec(shape, 8, 128) for shape, spec in specs)
        n_sharded = sum(spec != jax.sharding.PartitionSpec() for _, spec in specs)
        print("adapters sharded", n_sharded, "of", len(specs), "; losses", m1["loss"], m8["loss"])
        assert n_sharded > 0
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
        assert abs(float(m1["loss"]) - np.log(2)) > 1e-4
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(single.params)),
                                                                 jax.tree_util.tree_leaves(jax.device_get(sharded.params))))
        print("max |adapters 8 dev - 1 dev|", diff)
        assert diff < 1e-5
    """)
    proc = run_python(code, devices=8)
    print(proc.stdout)
    assert "adapters sharded" in proc.stdout
