"""Memory planning without hardware: compile (never run) the real train step at full size.

    python -m benchmarks.memory_plan --model=sd15 --batch=1 [--dtype=bfloat16] [--remat]
        [--remat_scope=unet|blocks|layers] [--remat_policy=NAME] [--attention=fused]
        [--cpu_scheduler=memory] [--lora_rank=8 [--param_dtype=bfloat16]]

Builds the project's jitted Diffusion-DPO step (`training.train_step.make_train_step`, the same
optimizer, shardings, frozen reference tree and denoiser as `agfsync-jax train` with
`train.text_encoding=cached`) for the full-size SD1.5 (512 px) or SDXL (1024 px) UNet with
*abstract* parameters (`jax.eval_shape`: nothing is allocated), lowers and compiles it for
`--batch` pairs per device on one device, and reports XLA's memory analysis (arguments,
outputs, temporaries, aliased = donated) and cost analysis (FLOPs). Master weights are float32;
`--dtype` is the compute dtype. `--lora_rank` plans the LoRA step instead (`train.lora.rank`:
adapters on the attention projections, their optimizer state, and the frozen base once, stored
in `--param_dtype`).

The numbers are XLA:CPU's buffer assignment on this machine: an estimate of what the GPU or TPU
compiler will plan (their fusion and layout choices differ), not a measurement on an
accelerator. XLA:CPU's default instruction scheduler is concurrency-optimised: it starts
independent work early (e.g. the rematerialised forward of many layers at once), which keeps
more buffers alive than a sequential accelerator stream would; `--cpu_scheduler=memory` plans
with its memory-minimising scheduler instead (see docs/performance.md for both).
Writes benchmarks/results/memory_plan-<model>-<dtype>-<remat>-b<batch>[-fused][-<tag>].json
(<remat> is "noremat", "remat" for the whole-UNet checkpoint, or "remat_<scope>[_<policy>]";
the tag is "memsched" for the memory-minimising scheduler; LoRA plans add -lora<rank>[-base_<dtype>]).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from agfsync_jax.models import remat as remat_lib  # imports jax, whose backend reads XLA_FLAGS later
from benchmarks import common

# Diffusers' SD1.x / SDXL training scheduler (scaled-linear betas, epsilon prediction).
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def text_shapes(unet_config: dict[str, Any], text_len: int = 77) -> dict[str, tuple[int, ...]]:
    """Cached-conditioning shapes per pair: embeddings, and SDXL's pooled embeddings and time ids."""
    shapes = {"embeds": (text_len, int(unet_config["cross_attention_dim"]))}
    if unet_config.get("addition_embed_type") == "text_time":
        time_ids = 6
        pooled = unet_config["projection_class_embeddings_input_dim"] - time_ids * unet_config["addition_time_embed_dim"]
        shapes.update(pooled=(pooled,), time_ids=(time_ids,))
    return shapes


def plan(model: str, batch: int, dtype: str, remat: bool, attention: str = "diffusers",
         remat_scope: str = "layers", remat_policy: str | None = None, lora_rank: int = 0,
         param_dtype: str = "float32") -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from diffusers import FlaxUNet2DConditionModel

    from agfsync_jax import lora, sharding
    from agfsync_jax.training import losses, noise as noise_lib
    from agfsync_jax.models.denoiser import make_denoiser
    from agfsync_jax.training.train_state import (abstract_train_state, learning_rate_schedule, make_optimizer,
                                                  train_state_shardings)
    from agfsync_jax.training.train_step import Frozen, frozen_shardings, make_train_step
    from configs import common as config_common

    config = config_common.base_config()
    config.train.remat = remat
    config.train.remat_scope = remat_scope
    if remat_policy:
        config.train.remat_policy = remat_policy
    compute = jnp.dtype(dtype)
    unet_config = common.unet_config(model)
    module = FlaxUNet2DConditionModel.from_config(unet_config, dtype=compute)
    params = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))  # float32 master weights
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))

    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    spec = losses.get_loss(config.train.loss)
    tx = make_optimizer(config.train)
    lora_scale = None
    if lora_rank > 0:
        # Trained: adapters (float32); frozen: the base once, which is also the reference.
        base = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(param_dtype)), params)
        trained = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
            lora.init_adapters(params, unet_config, lora_rank, ("attention",), jax.random.PRNGKey(0)))
        frozen = Frozen(base_params=base)
        lora_scale = 1.0
    else:
        trained, frozen = params, Frozen(ref_params=params)
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trained))
    abstract = abstract_train_state(trained, tx, 0)
    state_sh = train_state_shardings(abstract, mesh, config.mesh)
    frozen_sh = frozen_shardings(frozen, state_sh.params, mesh, config.mesh)
    step = make_train_step(
        denoiser=make_denoiser(module, config.train.remat_policy if remat else "", attention,
                               config.train.remat_scope, lora_scale=lora_scale), spec=spec,
        schedule=noise_lib.schedule_from_config(SCHEDULER), beta=float(config.train.beta), tx=tx,
        lr_schedule=learning_rate_schedule(config.train), mesh=mesh, state_shardings=state_sh,
        frozen_sharding=frozen_sh)

    latent = common.SIZES[model].latent_size
    inputs = {losses.WINNER: jax.ShapeDtypeStruct((batch, 4, latent, latent), jnp.float32),
              losses.LOSER: jax.ShapeDtypeStruct((batch, 4, latent, latent), jnp.float32)}
    for key, shape in text_shapes(unet_config).items():
        inputs[key] = jax.ShapeDtypeStruct((batch, *shape), compute if key != "time_ids" else jnp.float32)

    start = time.perf_counter()
    lowered = step.lower(abstract, frozen, inputs)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = common.xla_memory(compiled)
    flops = common.xla_flops(compiled)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    return {
        "model": model, "batch_pairs_per_device": batch, "compute_dtype": dtype, "remat": remat,
        "remat_scope": remat_scope if remat else None,
        "remat_policy": config.train.remat_policy if remat else None,
        "attention": attention,
        "unet_parameters": n_params,
        "lora_rank": lora_rank, "base_param_dtype": param_dtype if lora_rank else None,
        "trained_parameters": n_trained,
        "analytical_bytes": ({"policy_params_fp32": 4 * n_params, "adam_moments_fp32": 8 * n_params,
                              "reference_params_fp32": 4 * n_params} if not lora_rank else
                             {"base_params": jnp.dtype(param_dtype).itemsize * n_params,
                              "adapters_fp32": 4 * n_trained, "adam_moments_fp32": 8 * n_trained})
        | {"train_state_total": int(state_bytes)},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_memory": memory, "xla_flops_per_step": flops, "lower_s": lower_s, "compile_s": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd15", "sdxl", "mid", "tiny"), default="sd15")
    parser.add_argument("--batch", type=int, default=1, help="pairs per device")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--remat_scope", choices=remat_lib.SCOPES, default="layers",
                        help="with --remat: one checkpoint for the whole UNet, or one per block / layer")
    parser.add_argument("--remat_policy", default=None,
                        help="with --remat: a jax.checkpoint_policies name (default: the config's)")
    parser.add_argument("--attention", choices=("diffusers", "fused"), default="diffusers")
    parser.add_argument("--cpu_scheduler", choices=("default", "memory"), default="default",
                        help="memory: XLA:CPU's memory-minimising scheduler instead of its default "
                             "concurrency-optimised one (which keeps more buffers alive); adds -memsched")
    parser.add_argument("--lora_rank", type=int, default=0, help="> 0: plan the LoRA DPO step (attention adapters)")
    parser.add_argument("--param_dtype", choices=("float32", "bfloat16"), default="float32",
                        help="with --lora_rank: storage dtype of the frozen base UNet")
    parser.add_argument("--tag", default="", help="suffix of the result file (e.g. for an XLA_FLAGS variant)")
    args = parser.parse_args()
    if args.cpu_scheduler == "memory":  # read when jax starts its CPU backend (plan() imports jax)
        flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        args.tag = args.tag or "memsched"

    result = plan(args.model, args.batch, args.dtype, args.remat, args.attention, args.remat_scope,
                  args.remat_policy, args.lora_rank, args.param_dtype)
    remat = "noremat"
    if args.remat:
        remat = "remat" if args.remat_scope == "unet" else f"remat_{args.remat_scope}"
        remat += f"_{args.remat_policy}" if args.remat_policy else ""
    name = (f"memory_plan-{args.model}-{args.dtype}-{remat}-b{args.batch}"
            + ("-fused" if args.attention == "fused" else "")
            + (f"-lora{args.lora_rank}-base_{args.param_dtype}" if args.lora_rank else "")
            + (f"-{args.tag}" if args.tag else ""))
    out = common.write_result(name, result)
    mem = result["xla_memory"] or {}
    gib = {k: v / 2**30 for k, v in mem.items() if isinstance(v, (int, float))}
    print(f"memory_plan {args.model} {args.dtype} remat={remat} attention={args.attention} batch={args.batch}: "
          + ", ".join(f"{k} {v:.2f} GiB" for k, v in gib.items())
          + f" | {result['xla_flops_per_step'] or float('nan'):.3g} FLOP/step | compile {result['compile_s']:.0f} s"
          + f" -> {out}")


if __name__ == "__main__":
    main()
