"""The interface every scorer implements: a batch of (image, text, questions) -> scores 0-100.

A scorer owns its model, its device and its internal batching; the stage only hands it lists of
items. `version` is written next to every score (ScoreRow.scorers) so a number can always be
traced to the model and mode that produced it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from agfsync_jax.schemas import Question, VqaAnswer


@dataclasses.dataclass(frozen=True)
class ScoringItem:
    """One candidate as the scorers see it: its image, the text it was sampled for, and the
    questions about that text (empty when no scorer needs them)."""

    image: Image.Image
    text: str
    questions: tuple[Question, ...] = ()


class Scorer(abc.ABC):
    """A batched scorer. `score` returns one float64 per item, on a 0-100 scale."""

    #: Key of this scorer in ScoreRow.scores and in the weights.
    name: str = ""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Model and mode, e.g. "blip2-t5:likelihood"; recorded with every score."""

    @abc.abstractmethod
    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        """Scores of `items`, shape (len(items),), float64."""

    def score_with_answers(self, items: Sequence[ScoringItem]
                           ) -> tuple[np.ndarray, list[tuple[VqaAnswer, ...]] | None]:
        """Scores, and per item its per-question VQA answers; None from scorers that ask none
        (every scorer but VQA)."""
        return self.score(items), None


def batches(n: int, batch_size: int) -> list[slice]:
    """Slices covering range(n) in chunks of at most batch_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
