"""PickScore (Kirstain et al. 2023): an optional extra scorer, selected with scoring.extra.

PickScore_v1 is a CLIP ViT-H/14 finetuned on Pick-a-Pic preferences; its reward is
exp(logit_scale) x cos(E_image, E_text) with the model's *learned* logit scale (about 100, so
typical rewards are around 20), the same embedding path as the CLIP score. The AGFSync paper
uses it in its score ablation (Table 5). The PickScore folder ships without a processor; point
scoring.pickscore_processor_path at the CLIP-ViT-H-14 processor folder it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data_prep.scoring.clip_score import ClipEmbedder
from data_prep.scoring.scorer import Scorer, ScoringItem


class PickScoreScorer(Scorer):
    name = "pickscore"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype,
                 processor_path: str | Path | None = None, batch_size: int = 16):
        self.embedder = ClipEmbedder(path, device, dtype, processor_path=processor_path or None,
                                     batch_size=batch_size, what="scoring.pickscore_path")
        self.scale = float(self.embedder.model.logit_scale.detach().float().exp().cpu())

    @property
    def version(self) -> str:
        return f"pickscore:{self.embedder.path.name}"

    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        return self.scale * self.embedder.cosine(items)
