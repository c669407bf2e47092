"""Why a finetuned model does or does not beat its base on the training reward: two probes.

    python -m benchmarks.closed_loop_probe --workdir=workdir/demo [--guidance=7.5,3,1]

On a finished pipeline work directory this measures

1. *sampling sensitivity*: the relative change of the final latents (same prompts, same initial
   latents) between the base model and the exported finetuned UNet, per guidance scale. When a
   tiny weight change moves the latents by tens of percent, sampling is chaotic in the weights
   and the eval's base-vs-finetuned comparison is a fresh draw, not a small step along what
   training learned;
2. *preference structure*: the cosine of each pair's (winner - loser) latent difference with the
   mean difference over all pairs. A shared direction (cosines well above 1/sqrt(#pairs), the
   level for unrelated directions) is something one set of weights can learn for every prompt.

It writes benchmarks/results/closed_loop_probe.json and prints one line per measurement. Used in
docs/tiny_closed_loop.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PROMPTS = ("a red apple on a table", "a dog running in a park", "a city at night", "two cats on a sofa")


def sampling_sensitivity(base: Path, finetuned: Path, resolution: int, steps: int,
                         guidance_scales: list[float]) -> dict[str, list[float]]:
    import jax
    import jax.numpy as jnp

    from agfsync_jax.models.loading import load_stable_diffusion
    from agfsync_jax.models.text_encoding import tokenize
    from agfsync_jax.sampling import candidates
    from agfsync_jax.sampling.schedulers import make_scheduler

    sd = load_stable_diffusion(base)
    tuned_unet = load_stable_diffusion(finetuned, components=("unet",)).unet.params
    scheduler = make_scheduler("ddim", sd.scheduler_config, steps)
    n = len(PROMPTS)
    batch = {"token_ids": jnp.asarray(np.swapaxes(tokenize(sd.tokenizers, list(PROMPTS)), 0, 1)),
             "latent_keys": jnp.asarray(np.stack([[0, i] for i in range(n)]).astype(np.uint32)),
             "noise_keys": jnp.zeros((n, 2), jnp.uint32), "embeds_sigma": jnp.zeros((n,)),
             "pooled_sigma": jnp.zeros((n,))}
    uncond = candidates.unconditional(sd)
    base_params = candidates.model_params(sd, decode_images=False)
    out = {}
    for g in guidance_scales:
        models = candidates.candidate_models(sd, scheduler, resolution, g, decode_images=False)
        run = jax.jit(lambda p, m=models, g=g: candidates.generate(m, p, batch, uncond, jnp.float32(g))["latents"])
        a = np.asarray(run(base_params)).reshape(n, -1)
        b = np.asarray(run(dict(base_params, unet=tuned_unet))).reshape(n, -1)
        rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
        out[str(g)] = [round(float(r), 4) for r in rel]
        print(f"guidance {g}: relative change of the final latents per prompt {[round(float(r), 3) for r in rel]}")
    return out


def preference_structure(workdir: Path) -> dict[str, float]:
    from agfsync_jax import workdir as workdir_lib
    from agfsync_jax.schemas import ScoreRow, read_jsonl

    rows: dict[str, list[ScoreRow]] = {}
    for path in sorted((workdir / workdir_lib.SCORES).glob("scores-*.jsonl")):
        for row in read_jsonl(path, ScoreRow.from_dict):
            if row.instruction == 0:
                rows.setdefault(row.prompt_id, []).append(row)
    manifest = {}
    for path in sorted((workdir / workdir_lib.CANDIDATES).glob("manifest-*.jsonl")):
        for line in path.read_text().splitlines():
            m = json.loads(line)
            manifest[(m["prompt_id"], m["instruction"], m["candidate"])] = m["latent"]
    diffs = []
    for pid, cands in rows.items():
        if len(cands) < 2:
            continue
        best, worst = max(cands, key=lambda r: r.total), min(cands, key=lambda r: r.total)
        load = lambda r: np.load(workdir / workdir_lib.CANDIDATES / manifest[(pid, 0, r.candidate)])  # noqa: E731
        diffs.append((load(best) - load(worst)).ravel())
    d = np.stack(diffs)
    mean = d.mean(0)
    cos = d @ mean / (np.linalg.norm(d, axis=1) * np.linalg.norm(mean))
    result = {"pairs": len(d), "mean_cosine_with_mean_difference": float(cos.mean()),
              "chance_level_1_over_sqrt_pairs": float(1 / np.sqrt(len(d)))}
    print(f"{len(d)} pairs: mean cosine of (winner - loser) with their mean {cos.mean():.3f} "
          f"(unrelated directions give about {1 / np.sqrt(len(d)):.3f})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--guidance", default="7.5,3,1")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from agfsync_jax import workdir as workdir_lib
    from benchmarks import common

    result = {
        "workdir": str(args.workdir),
        "sampling_sensitivity": sampling_sensitivity(
            args.workdir / "base_model", args.workdir / workdir_lib.EXPORT / "pipeline", args.resolution,
            args.steps, [float(g) for g in args.guidance.split(",")]),
        "preference_structure": preference_structure(args.workdir),
    }
    common.write_result("closed_loop_probe", result)


if __name__ == "__main__":
    main()
