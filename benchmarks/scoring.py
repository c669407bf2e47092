"""Images/s of each scorer of the scoring stage (PyTorch), through the stage's own factory.

    python -m benchmarks.scoring                      # the tiny random scorers the demo uses
    python -m benchmarks.scoring --vqa_path=/models/blip2-flan-t5-xxl \
        --clip_path=/models/clip-vit-base-patch16 --aesthetic_clip_path=/models/clip-vit-large-patch14 \
        --aesthetic_head_path=/models/sac+logos+ava1-l14-linearMSE.pth --device=cuda \
        --hps_path=/models/HPS_v2.1_compressed.pt --vila_path=/models/vila

Every scorer gets the same batch of random RGB images (`--resolution` px), prompts and
`--questions` yes-questions per image; model loading is excluded, one untimed warm-up batch runs
first. Writes benchmarks/results/scoring-<tag>.json and one summary line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

PATH_FIELDS = ("vqa_path", "clip_path", "aesthetic_clip_path", "aesthetic_head_path", "pickscore_path",
               "hps_path", "vila_path")


def _items(n: int, resolution: int, questions: int, seed: int) -> list:
    from PIL import Image

    from agfsync_jax.schemas import Question
    from data_prep.scoring.scorer import ScoringItem

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        qs = tuple(Question(question=f"is there a red cat number {k} in the image?", element="cat",
                            element_type="animal/human") for k in range(questions))
        items.append(ScoringItem(image=Image.fromarray(pixels), text=f"a photo of red cat number {i}",
                                 questions=qs))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images per timed repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--questions", type=int, default=5, help="yes-questions per image (VQA)")
    parser.add_argument("--batch_size", type=int, default=16, help="scoring.batch_size")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--vqa_mode", default="likelihood", choices=("likelihood", "generate"))
    parser.add_argument("--scorers", default="vqa,clip,aesthetic,pickscore,hps,vila")
    parser.add_argument("--aesthetic", default="laion", choices=("laion", "vila"),
                        help="scoring.aesthetic (VILA is also timed on its own as 'vila')")
    for field in PATH_FIELDS:
        parser.add_argument(f"--{field}", default="", help="empty everywhere: the tiny random scorers")
    parser.add_argument("--hps_model", default="ViT-H-14", help="scoring.hps_model")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    import torch

    from configs import common as config_common
    from data_prep.scoring import factory
    from data_prep.scoring.device import select_device
    from data_prep.scoring.tiny import save_tiny_scorers

    scoring = config_common.base_config().scoring
    scoring.device, scoring.batch_size, scoring.vqa_mode = args.device, args.batch_size, args.vqa_mode
    scoring.aesthetic, scoring.hps_model = args.aesthetic, args.hps_model
    paths = {f: getattr(args, f) for f in PATH_FIELDS}
    tiny = not any(paths.values())
    with tempfile.TemporaryDirectory() as tmp:
        if tiny:
            paths = {k: str(v) for k, v in save_tiny_scorers(Path(tmp) / "tiny").items()}
        for field, value in paths.items():
            setattr(scoring, field, value)
        items = _items(args.images, args.resolution, args.questions, seed=0)
        results = {}
        for name in [s.strip() for s in args.scorers.split(",") if s.strip()]:
            needs = {"vqa": "vqa_path", "clip": "clip_path", "pickscore": "pickscore_path", "hps": "hps_path",
                     "vila": "vila_path",
                     "aesthetic": "vila_path" if args.aesthetic == "vila" else "aesthetic_head_path"}[name]
            if not getattr(scoring, needs):
                print(f"{name}: no model path given, skipped")
                continue
            scorer = factory.build_scorer(name, scoring)
            scorer.score(items[: args.batch_size])  # warm-up (lazy init, allocator)
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                scores = scorer.score(items)
                times.append(time.perf_counter() - start)
            stats = common.summarise(times)
            results[name] = {"version": scorer.version, "images_per_s": args.images / stats["median_s"],
                             "timing": stats, "mean_score": float(np.mean(scores))}
            print(f"{name}: {results[name]['images_per_s']:.1f} images/s ({scorer.version})")
    device = str(select_device(args.device)[0])
    tag = args.tag or ("tiny" if tiny else "models")
    result = {"benchmark": "scoring", "tiny_models": tiny, "device": device, "torch_threads": torch.get_num_threads(),
              "images": args.images, "resolution": args.resolution, "questions_per_image": args.questions,
              "batch_size": args.batch_size, "vqa_mode": args.vqa_mode, "scorers": results}
    out = common.write_result(f"scoring-{tag}", result)
    summary = ", ".join(f"{k} {v['images_per_s']:.1f}" for k, v in results.items())
    print(f"scoring {tag} on {device}: images/s {summary} -> {out}")


if __name__ == "__main__":
    main()
