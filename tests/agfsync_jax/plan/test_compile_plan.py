"""The plan's programs are the run's programs; the TPU compiler's plan of the tiny config.

The compile tests run in subprocesses: libtpu must not be loaded into the pytest process (only
one process at a time may hold it), and each subprocess releases it by exiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agfsync_jax import sharding
from agfsync_jax.plan import topology
from configs import tiny

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("family, text_encoding", [("sd1", "in_step"), ("sd1", "cached"), ("sdxl", "in_step")])
def test_planned_batch_is_what_the_training_loop_feeds(family, text_encoding, request):
    """`train_batch_shapes` (shapes only) == `training.train.step_inputs` on a real batch."""
    from agfsync_jax.models.loading import abstract_stable_diffusion
    from agfsync_jax.plan.compile_plan import train_batch_shapes
    from agfsync_jax.training import losses, text as text_lib
    from agfsync_jax.training.train import step_inputs

    sd = request.getfixturevalue(f"tiny_{family}")
    config = tiny.get_config()
    config.train.text_encoding = text_encoding
    config.train.batch_size = 2
    mesh = sharding.make_mesh(config.mesh)
    raw = {"winner_latent": np.zeros((2, 4, 16, 16), np.float32), "loser_latent": np.zeros((2, 4, 16, 16), np.float32),
           "prompt": np.array(["a cat", "a dog"]), "prompt_2": np.array(["", ""]), "is_cross": np.zeros(2, bool)}
    encoder = text_lib.PromptEncoder(sd, np.dtype(np.float32)) if text_encoding == "cached" else None
    real = step_inputs(raw, spec=losses.get_loss("dpo"), sd=sd, text_mode=text_encoding, prompt_encoder=encoder,
                       resolution=32)
    planned = train_batch_shapes(config, abstract_stable_diffusion(sd.path), mesh)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in planned.items()} == \
        {k: (np.shape(v), np.asarray(v).dtype) for k, v in real.items()}


def _lock_is_free() -> bool:
    if not os.path.exists(topology.LIBTPU_LOCKFILE):
        return True
    with open(topology.LIBTPU_LOCKFILE) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _run(args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


_PLAN_TINY = r"""
import json, sys, tempfile, warnings
from pathlib import Path
import jax, numpy as np
warnings.filterwarnings("ignore")
from configs import tiny
from agfsync_jax import sharding
from agfsync_jax.plan import compile_plan, topology
from benchmarks import flops as analytical

config = tiny.get_config()
config.mesh.fsdp = 4
config.mesh.min_shard_size = 256  # shard the tiny model's kernels too (the default keeps them whole)
topo = topology.parse_topology("v5e:2x2")
devices = topology.compile_only_devices(topo)
mesh = sharding.make_mesh(config.mesh, devices=devices)
sd = compile_plan.abstract_model(config, compile_plan.model_folder(config, Path(tempfile.mkdtemp())))
train = compile_plan.plan_train_step(config, sd, mesh, topo.chip.hbm_bytes)
sample = compile_plan.plan_sampler(config, sd, mesh, topo.chip.hbm_bytes)

# Independent numbers. The train step's outputs are the new state (its shardings are the FSDP
# rules, applied here by hand to the shapes) and replicated scalar metrics.
setup = compile_plan.build_training(config, sd, mesh)
state = setup.abstract_state
def shard_elements(x):
    return int(np.prod(x.sharding.shard_shape(x.shape)))
state_leaves = jax.tree_util.tree_leaves(state)
fsdp_sharded = sum(s.sharding.spec != jax.sharding.PartitionSpec() for s in state_leaves)
unet = analytical.unet_forward_flops(dict(sd.unet.config), 16).total
text = analytical.clip_text_flops(32, 2, 64)
print(json.dumps({"train": train.to_json(), "sample": sample.to_json(),
                  "state_bytes_per_device": sum(shard_elements(x) * x.dtype.itemsize for x in state_leaves),
                  "state_bytes_replicated": sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in state_leaves),
                  "fsdp_sharded_leaves": fsdp_sharded,
                  "analytical_pair": analytical.dpo_pair_flops(unet, text)["total"],
                  "analytical_image": 2 * int(config.sampling.steps) * unet + text}))
"""


@pytest.mark.slow
def test_tiny_train_step_and_sampler_fit_a_v5e_2x2_with_fsdp4():
    assert _lock_is_free(), f"{topology.LIBTPU_LOCKFILE} is held by another process"
    proc = _run(["-c", _PLAN_TINY])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    train, sample = out["train"], out["sample"]
    print({k: v for k, v in train.items() if k in ("memory", "flops_per_item", "compiler_flops_per_device")})
    print({k: v for k, v in sample.items() if k in ("memory", "flops_per_item", "compiler_flops_per_device")})
    assert train["fits"] and sample["fits"] and train["mesh"] == {"data": 1, "fsdp": 4}
    for plan in (train, sample):
        m = plan["memory"]
        assert all(m[k] > 0 for k in ("argument", "output", "temp", "generated_code"))
        assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
        assert m["peak"] < plan["hbm_bytes"]
    # FSDP really shards the state: a device holds well under the replicated state.
    assert out["fsdp_sharded_leaves"] > 0 and out["state_bytes_per_device"] < 0.6 * out["state_bytes_replicated"]
    m = train["memory"]
    # The state is donated: its buffers are the aliased part of the outputs (TPU layouts pad
    # small dimensions to tiles, so the compiler's bytes are at least the shapes' bytes), and the
    # rest of the outputs is a few scalar metrics.
    assert m["alias"] >= out["state_bytes_per_device"] and m["output"] - m["alias"] < 2**16
    # FLOPs: the traced count against benchmarks/flops.py's analytical formulas (2 % for the
    # pair: the formulas leave out nothing that is a matmul or conv but the text projection).
    assert train["flops_per_item"] == pytest.approx(out["analytical_pair"], rel=0.02)
    assert sample["flops_per_item"] > out["analytical_image"]  # plus the VAE decoder
    assert sample["flops_per_item"] < 1.3 * out["analytical_image"]
    # The compiler's own count of the loop-free train step agrees (it adds elementwise work);
    # for the sampler it counts the denoising loop once, hence the trip-count-aware count.
    assert train["compiler_flops_per_device"] == pytest.approx(train["flops_per_device"], rel=0.25)
    assert sample["compiler_flops_per_device"] < 0.5 * sample["flops_per_device"]
    assert _lock_is_free(), "libtpu's lock outlived the plan process"


@pytest.mark.slow
@pytest.mark.parametrize("override, fix", [
    # The compiler itself refuses a per-device batch no chip holds ...
    ("--config.train.batch_size=65536", "--config.train.grad_accum_steps=2"),
    # ... and a plan against a budget smaller than the program fails our check.
    ("--config.plan.hbm_gib=0.05", "--config.train.remat=True"),
])
def test_a_config_that_does_not_fit_exits_nonzero_naming_the_fix(override, fix):
    assert _lock_is_free(), f"{topology.LIBTPU_LOCKFILE} is held by another process"
    proc = _run(["-m", "agfsync_jax.main", "plan", "--config=configs/tiny.py", "--topology=v5e:2x2",
                 "--config.mesh.fsdp=4", "--config.plan.programs=train", override])
    print(proc.stdout[-3000:])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stdout and fix in proc.stdout
    assert _lock_is_free()


def test_plan_needs_a_topology_and_says_so():
    proc = _run(["-m", "agfsync_jax.main", "plan", "--config=configs/tiny.py", "--topology=v9:1x1"], timeout=300)
    assert proc.returncode == 2 and "unknown TPU generation 'v9'" in proc.stderr
