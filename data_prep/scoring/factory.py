"""The scorers a config asks for: every scorer with a non-zero weight, plus scoring.extra.

Scorers with zero weight are not loaded (no model, no time) unless named in scoring.extra, which
computes and records a score (e.g. PickScore for the paper's ablation) without weighting it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_prep.scoring.device import select_device
from data_prep.scoring.scorer import Scorer

BUILTIN = ("vqa", "clip", "aesthetic")
EXTRA = ("pickscore",)


def parse_extra(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in EXTRA:
            raise ValueError(f"scoring.extra names {n!r}; extra scorers are {EXTRA} "
                             f"(built-in scorers {BUILTIN} are selected by their weights)")
    return names


def required_scorers(weights: Mapping[str, float], extra: str) -> list[str]:
    """Names of the scorers to run, in a fixed order."""
    known = BUILTIN + EXTRA
    for name in weights:
        if name not in known:
            raise ValueError(f"score weight for unknown scorer {name!r}; known scorers: {known}")
    wanted = {n for n, w in weights.items() if w > 0} | set(parse_extra(extra))
    return [n for n in known if n in wanted]


def _path(scoring: Any, field: str, scorer: str) -> str:
    value = getattr(scoring, field)
    if not value:
        raise ValueError(f"scorer {scorer!r} is needed but scoring.{field} is empty")
    return value


def build_scorer(name: str, scoring: Any) -> Scorer:
    device, dtype = select_device(scoring.device)
    bs = scoring.batch_size
    if name == "vqa":
        from data_prep.scoring.vqa import VqaScorer

        return VqaScorer(_path(scoring, "vqa_path", name), scoring.vqa_mode, device, dtype, batch_size=bs,
                         prompt=scoring.vqa_prompt, max_new_tokens=scoring.vqa_max_new_tokens)
    if name == "clip":
        from data_prep.scoring.clip_score import ClipScorer

        return ClipScorer(_path(scoring, "clip_path", name), device, dtype, batch_size=bs)
    if name == "aesthetic":
        from data_prep.scoring.aesthetic import AestheticScorer

        return AestheticScorer(_path(scoring, "aesthetic_clip_path", name),
                               _path(scoring, "aesthetic_head_path", name), device, dtype, batch_size=bs)
    if name == "pickscore":
        from data_prep.scoring.pickscore import PickScoreScorer

        return PickScoreScorer(_path(scoring, "pickscore_path", name), device, dtype,
                               processor_path=scoring.pickscore_processor_path or None, batch_size=bs)
    raise ValueError(f"unknown scorer {name!r}")


def build_scorers(names: list[str], scoring: Any) -> dict[str, Scorer]:
    return {name: build_scorer(name, scoring) for name in names}
