"""Score weights: named presets or explicit `name=weight` lists, and the weighted total.

    paper          S = 0.35 VQA + 0.55 CLIP + 0.10 aesthetic   (AGFSync Eq. 9)
    released_code  S = 0.85 CLIP + 0.15 aesthetic              (the authors' code; no VQA)
    custom         scoring.weights, e.g. "vqa=0.3,clip=0.5,aesthetic=0.1,hps=0.1"

Every score is on 0-100 (HPS v2 as 100 x its cosine, like the CLIP score; VILA as 100 x its 0-1
prediction), so the total is too when the weights sum to 1 (they need not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

PRESETS: dict[str, dict[str, float]] = {
    "paper": {"vqa": 0.35, "clip": 0.55, "aesthetic": 0.10},
    "released_code": {"clip": 0.85, "aesthetic": 0.15},
}
CUSTOM = "custom"


def parse_weights(text: str) -> dict[str, float]:
    """'vqa=0.35, clip=0.55' -> {'vqa': 0.35, 'clip': 0.55}; malformed entries raise."""
    weights: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"scoring.weights entry {entry!r} is not name=weight")
        try:
            w = float(value)
        except ValueError as e:
            raise ValueError(f"scoring.weights entry {entry!r}: {value!r} is not a number") from e
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"scoring.weights entry {entry!r}: weight must be finite and >= 0")
        if name in weights:
            raise ValueError(f"scoring.weights names {name!r} twice")
        weights[name] = w
    return weights


def resolve_weights(preset: str, explicit: str = "") -> dict[str, float]:
    """The weights of a config: a preset, or explicit weights with preset "custom"."""
    if preset == CUSTOM:
        weights = parse_weights(explicit)
        if not weights:
            raise ValueError("scoring.weights_preset is 'custom' but scoring.weights is empty")
    elif preset in PRESETS:
        if explicit.strip():
            raise ValueError(f"scoring.weights is set but scoring.weights_preset is {preset!r}; "
                             "set weights_preset='custom' to use explicit weights")
        weights = dict(PRESETS[preset])
    else:
        raise ValueError(f"scoring.weights_preset is {preset!r}; expected one of {(*PRESETS, CUSTOM)}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"all score weights are zero: {weights}")
    return weights


def weighted_total(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum_i w_i s_i over the weighted scores; a weighted score that is missing raises."""
    total = 0.0
    for name, w in weights.items():
        if w == 0:
            continue
        if name not in scores:
            raise KeyError(f"score {name!r} has weight {w} but was not computed (have {sorted(scores)})")
        total += w * scores[name]
    return total
