"""Our jitted Diffusion-DPO train step vs a PyTorch reference step, side by side in one run.

    python -m benchmarks.dpo_step --model=tiny
    python -m benchmarks.dpo_step --model=mid
    python -m benchmarks.dpo_step --model=mid --dtype=bfloat16
    python -m benchmarks.dpo_step --model=sd15 --dtype=bfloat16 --batch=8 --peak_flops=989e12  # a GPU

Both sides train the same UNet (one random diffusers PyTorch pipeline, saved with
`save_pretrained` and loaded into Flax by `agfsync_jax.models.loading`) on the same batch of
pairs (cached latents + token ids) in the same dtype:

  JAX    the step `agfsync_jax.training.train.build_training` builds for the trainer (policy
         forward on winners+losers, one reference forward on both, frozen text encoder in the
         step, clip + AdamW, non-finite guard), with the batch placed from host numpy each step
         as the training loop does.
  torch  benchmarks/torch_dpo_reference.py: the official Diffusion-DPO trainer's recipe.

Compilation is timed on its own (lower, compile); then both sides warm up and the timed
repetitions alternate JAX / torch (order flipped every repetition) so that load from other
processes on a shared machine hits both alike. Medians are the headline. FLOPs per step come
from XLA's cost analysis of the compiled program, giving achieved FLOP/s and, with
--peak_flops, MFU (the analytical count of benchmarks/flops.py is printed alongside). Prints
one line, e.g.

    dpo_step mid float32 B=2 pairs: jax 1.23 pairs/s, torch 0.81 pairs/s, jax/torch 1.52x | compile 41.0 s | XLA 139 GFLOP/step (analytical 140), 171 GFLOP/s, MFU n/a | recompiles 0

and writes benchmarks/results/dpo_step_<model>_<dtype>.json (or --name).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import common, flops as flops_lib

DEFAULT_BATCH = {"tiny": 8, "mid": 2, "sd15": 8}
DEFAULT_REPS = {"tiny": 20, "mid": 6, "sd15": 10}
LEARNING_RATE = 1e-5  # the same on both sides; the value does not change the cost


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=common.MODEL_SIZES, default="tiny")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default per model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (master weights stay float32 on both sides)")
    p.add_argument("--remat", action="store_true", help="JAX: config.train.remat=True")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compiling")
    p.add_argument("--reps", type=int, default=None, help="timed steps per side (default per model)")
    p.add_argument("--peak_flops", type=float, default=None,
                   help="device peak FLOP/s for MFU, e.g. 989e12 for an H100's bf16 dense peak")
    p.add_argument("--skip_torch", action="store_true", help="time only the JAX step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file name (default dpo_step_<model>_<dtype>)")
    p.add_argument("--out_dir", default=str(common.RESULTS_DIR))
    return p.parse_args(argv)


def _host_batch(b: int, latent_hw: int, seed: int) -> dict[str, np.ndarray]:
    """What the pair dataset yields for one global batch (see agfsync_jax.pairs.dataset)."""
    rng = np.random.default_rng(seed)
    words = ("red", "blue", "cat", "dog", "house", "tree", "on", "a", "table", "under", "sky", "two")
    prompts = [" ".join(rng.choice(words, size=8)) for _ in range(b)]
    return {
        "winner_latent": rng.standard_normal((b, 4, latent_hw, latent_hw)).astype(np.float32),
        "loser_latent": rng.standard_normal((b, 4, latent_hw, latent_hw)).astype(np.float32),
        "prompt": np.array(prompts, object), "prompt_2": np.array([""] * b, object),
        "prompt_id": np.array([str(i) for i in range(b)], object), "is_cross": np.zeros(b, bool),
    }


class JaxSide:
    """The trainer's step on this process's devices; `__call__` runs one step and waits for it."""

    def __init__(self, pipe_path: Any, raw: dict[str, np.ndarray], args: argparse.Namespace):
        import jax

        from agfsync_jax import sharding
        from agfsync_jax.models.dtype_policy import DtypePolicy
        from agfsync_jax.models.loading import load_stable_diffusion
        from agfsync_jax.training.train import build_training
        from configs.common import base_config

        self._jax, self._sharding = jax, sharding
        cfg = base_config()
        cfg.model.compute_dtype = args.dtype
        cfg.model.resolution = common.SIZES[args.model].resolution
        cfg.train.batch_size = len(raw["prompt"])
        cfg.train.learning_rate = LEARNING_RATE
        cfg.train.remat = bool(args.remat)
        cfg.train.text_encoding = "in_step"  # the torch reference also encodes in its step
        self.config = cfg
        self.sd = load_stable_diffusion(pipe_path, DtypePolicy.from_config(cfg.model),
                                        components=("unet", "text_encoders"))
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.setup = build_training(cfg, self.sd, self.mesh)
        self.state = self.setup.initial_state(args.seed)
        # Host-side preparation (tokenising) happens once; each step places the numpy batch on
        # the mesh, which is the one host->device copy the training loop makes per step.
        self.host_batch = self.setup.inputs(raw)
        self.compiled = None

    def compile(self) -> dict[str, Any]:
        jax = self._jax
        batch = self._sharding.place_batch(self.host_batch, self.mesh)
        t0 = time.perf_counter()
        lowered = self.setup.train_step.lower(self.state, self.setup.frozen, batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        return {"lower_s": t1 - t0, "compile_s": t2 - t1, "flops_per_step": common.xla_flops(self.compiled),
                "memory": common.xla_memory(self.compiled), "devices": jax.device_count(),
                "mesh": dict(self.mesh.shape)}

    def __call__(self) -> float:
        jax = self._jax
        batch = self._sharding.place_batch(self.host_batch, self.mesh)
        # Implicit transfers inside the step (a host constant, a Python scalar re-sent every
        # call) would raise here; the explicit batch placement above is allowed.
        with jax.transfer_guard("disallow"):
            self.state, metrics = self.setup.train_step(self.state, self.setup.frozen, batch)
        jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])


class TorchSide:
    def __init__(self, pipe: Any, raw: dict[str, np.ndarray], args: argparse.Namespace):
        import torch
        from diffusers import DDPMScheduler

        from benchmarks.torch_dpo_reference import TorchDPOStep

        self._torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        # The official trainer's noise scheduler: DDPM with the base model's betas.
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.step = TorchDPOStep(pipe.unet.to(self.device), pipe.text_encoder.to(self.device), scheduler,
                                 learning_rate=LEARNING_RATE, dtype=dtype)
        ids = pipe.tokenizer(list(raw["prompt"]), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        self.host = {"w": torch.from_numpy(raw["winner_latent"]), "l": torch.from_numpy(raw["loser_latent"]),
                     "ids": ids}
        self.generator = torch.Generator(self.device).manual_seed(args.seed)

    def __call__(self) -> float:
        torch = self._torch
        b = {k: v.to(self.device) for k, v in self.host.items()}  # per-step copy, as a dataloader's
        loss = self.step(b["w"], b["l"], b["ids"], self.generator)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = fn()
    return time.perf_counter() - t0, loss


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message="Flax classes are deprecated")
    args = _parse(argv)
    batch = args.batch or DEFAULT_BATCH[args.model]
    reps = args.reps or DEFAULT_REPS[args.model]
    name = args.name or f"dpo_step_{args.model}_{args.dtype}{'_remat' if args.remat else ''}"
    spec = common.SIZES[args.model]

    from agfsync_jax.sampling.compile_count import CompileCounter

    raw = _host_batch(batch, spec.latent_size, args.seed)
    with common.saved_pipeline(args.model, args.seed) as (pipe, path):
        jx = JaxSide(path, raw, args)
    compile_info = jx.compile()
    th = None if args.skip_torch else TorchSide(pipe, raw, args)

    first_loss = {"jax": jx()}
    if th is not None:
        first_loss["torch"] = th()
    for _ in range(args.warmup - 1):
        jx()
        if th is not None:
            th()

    times: dict[str, list[float]] = {"jax": [], "torch": []}
    with CompileCounter() as compiles:
        for r in range(reps):
            order = [("jax", jx), ("torch", th)] if r % 2 == 0 else [("torch", th), ("jax", jx)]
            for side, fn in order:
                if fn is not None:
                    times[side].append(_timed(fn)[0])
    del pipe

    analytic = flops_lib.model_flops(args.model)["dpo_pair"]["total"] * batch
    xla_step = compile_info["flops_per_step"]
    result: dict[str, Any] = {
        "benchmark": "dpo_step", "model": args.model, "dtype": args.dtype, "remat": args.remat,
        "batch_pairs": batch, "latent_hw": spec.latent_size, "warmup": args.warmup, "reps": reps,
        "first_step_loss": first_loss, "expected_first_loss": math.log(2.0),
        "analytical_flops_per_step": analytic,
        "jax": dict(compile_info, recompiles_in_timed_loop=compiles.count, steps=common.summarise(times["jax"]),
                    times_s=times["jax"]),
    }
    jstep = result["jax"]["steps"]["median_s"]
    result["jax"]["pairs_per_s"] = batch / jstep
    result["jax"]["achieved_flops_per_s"] = xla_step / jstep if xla_step else None
    result["jax"]["mfu"] = common.mfu(result["jax"]["achieved_flops_per_s"], args.peak_flops)
    result["peak_flops"] = args.peak_flops
    if th is not None:
        tstep = common.summarise(times["torch"])
        result["torch"] = {"device": str(th.device), "threads": th._torch.get_num_threads(), "steps": tstep,
                           "times_s": times["torch"], "pairs_per_s": batch / tstep["median_s"],
                           # the same work, counted once (analytically) for both sides
                           "achieved_flops_per_s": analytic / tstep["median_s"]}
        result["jax_over_torch"] = result["jax"]["pairs_per_s"] / result["torch"]["pairs_per_s"]
    out = common.write_result(name, result, args.out_dir)

    torch_part = ""
    if th is not None:
        torch_part = (f", torch {result['torch']['pairs_per_s']:.4g} pairs/s, "
                      f"jax/torch {result['jax_over_torch']:.3g}x")
    mfu = result["jax"]["mfu"]
    torch_loss = "" if th is None else f" torch {first_loss['torch']:.4f}"
    print(f"dpo_step {args.model} {args.dtype}{' remat' if args.remat else ''} B={batch} pairs: "
          f"jax {result['jax']['pairs_per_s']:.4g} pairs/s{torch_part} | "
          f"compile {compile_info['compile_s']:.1f} s (lower {compile_info['lower_s']:.1f} s) | "
          f"XLA {xla_step / 1e9 if xla_step else float('nan'):.4g} GFLOP/step (analytical {analytic / 1e9:.4g}), "
          f"{common.fmt_rate(result['jax']['achieved_flops_per_s'])}, "
          f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | recompiles {compiles.count} | "
          f"first loss jax {first_loss['jax']:.4f}"
          f"{torch_loss} "
          f"(log 2 = {math.log(2):.4f}) -> {out}")
    return result


if __name__ == "__main__":
    main()
