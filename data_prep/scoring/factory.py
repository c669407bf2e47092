"""The scorers a config asks for: every scorer with a non-zero weight, plus scoring.extra.

Scorers with zero weight are not loaded (no model, no time) unless named in scoring.extra, which
computes and records a score (e.g. PickScore for the paper's ablation, HPS v2 for its benchmark)
without weighting it. An extra scorer can be weighted too ("hps=0.2" in scoring.weights).

The "aesthetic" score comes from the scorer `scoring.aesthetic` selects: "vila" (the paper's and
the authors' code's VILA, vila.py) or "laion" (the LAION head on CLIP ViT-L/14, aesthetic.py).
The extra "vila" records VILA under its own name, beside a LAION "aesthetic".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_prep.scoring.device import select_device
from data_prep.scoring.scorer import Scorer

BUILTIN = ("vqa", "clip", "aesthetic")
EXTRA = ("pickscore", "hps", "vila")
AESTHETICS = ("vila", "laion")


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


def _aesthetic(scoring: Any) -> str:
    if scoring.aesthetic not in AESTHETICS:
        raise ValueError(f"scoring.aesthetic is {scoring.aesthetic!r}; expected one of {AESTHETICS}")
    return scoring.aesthetic


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
    if name == "aesthetic" and _aesthetic(scoring) == "vila":
        from data_prep.scoring.vila import VilaScorer

        if not scoring.vila_path:
            raise ValueError("scorer 'aesthetic' is needed and scoring.aesthetic is 'vila' (the paper's), but "
                             "scoring.vila_path is empty: set it to the VILA SavedModel folder, or set "
                             "scoring.aesthetic='laion' for the LAION head")
        return VilaScorer(scoring.vila_path, name="aesthetic")
    if name == "vila":
        from data_prep.scoring.vila import VilaScorer

        return VilaScorer(_path(scoring, "vila_path", name), name="vila")
    if name == "hps":
        from data_prep.scoring.hps import HpsScorer

        return HpsScorer(_path(scoring, "hps_path", name), _path(scoring, "hps_model", name), device, dtype,
                         batch_size=bs)
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
    if "vila" in names and "aesthetic" in names and _aesthetic(scoring) == "vila":
        raise ValueError("scoring.extra names 'vila' but scoring.aesthetic is already 'vila': its score is "
                         "'aesthetic'; drop 'vila' from scoring.extra")
    # PyTorch scorers first: in one process, TensorFlow (VILA) loaded before triton, which
    # torchvision and transformers' models import, has been seen to crash the interpreter.
    order = sorted(names, key=lambda n: n == "vila" or (n == "aesthetic" and _aesthetic(scoring) == "vila"))
    built = {name: build_scorer(name, scoring) for name in order}
    return {name: built[name] for name in names}
