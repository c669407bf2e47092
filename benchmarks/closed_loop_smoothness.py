"""Experiment: does the tiny closed loop close with a reward the tiny VAE can express?

    python -m benchmarks.closed_loop_smoothness pipeline --config=configs/tiny.py --workdir=DIR \
        --config.scoring.weights_preset=custom --config.scoring.weights=smoothness=1 [overrides]

Runs the real `agfsync-jax` CLI with one experiment-only scorer added, "smoothness":

    smoothness = 100 - 10 log10(Var(Laplacian(luminance)))      luminance on 0-100

the variance of the 4-neighbour Laplacian being the usual no-reference focus measure (Pech-Pacheco
et al. 2000), negated so that smoother images win. The random tiny scorers rank candidates by
preferences that share no direction across prompts (docs/tiny_closed_loop.md); this reward is
prompt-independent, and the random tiny VAE's images do respond to it: blurring the final
latents with a 3x3 binomial filter lowers the Laplacian variance of the decoded images by 41%,
whereas scaling the latents by 2 or shifting a channel by 0.5 moves brightness and colourfulness
by under 1% (the decoder's GroupNorms remove global latent statistics). Not a project scorer:
it exists to test whether the loop can close, and docs/tiny_closed_loop.md reports the result.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from data_prep.scoring import factory
from data_prep.scoring.scorer import Scorer, ScoringItem

NAME = "smoothness"


def smoothness(image: np.ndarray) -> float:
    """(H, W, 3) uint8 -> 100 - 10 log10 of the variance of the luminance Laplacian (periodic edges)."""
    x = image.astype(np.float64) * (100.0 / 255.0)
    lum = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    lap = (np.roll(lum, 1, 0) + np.roll(lum, -1, 0) + np.roll(lum, 1, 1) + np.roll(lum, -1, 1) - 4 * lum)
    return 100.0 - 10.0 * float(np.log10(lap.var()))


class SmoothnessScorer(Scorer):
    name = NAME
    version = "smoothness:laplacian-variance"

    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        return np.array([smoothness(np.asarray(it.image.convert("RGB"))) for it in items], dtype=np.float64)


def main() -> None:
    factory.EXTRA = (*factory.EXTRA, NAME)
    build = factory.build_scorer
    factory.build_scorer = lambda name, scoring: SmoothnessScorer() if name == NAME else build(name, scoring)
    from agfsync_jax.main import run

    sys.argv = ["agfsync-jax", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
