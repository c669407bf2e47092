"""A fake eval workdir for the judge tests (the rule-judging server is in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agfsync_jax.schemas import ManifestRow, PromptRecord

# --- a fake eval workdir --------------------------------------------------------------------------

def write_png(path: Path, level: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), level, np.uint8)).save(path, format="PNG")


def make_eval_workdir(root: Path, prompts: list[tuple[str, str, int, int | None]],
                      seed: int = 200) -> Path:
    """An eval set directory (WORKDIR/eval/<set>): {base,finetuned} as the eval stage leaves them.

    prompts: (id, text, base brightness, finetuned brightness or None for no finetuned image).
    """
    for model in ("base", "finetuned"):
        model_dir = root / model
        records = [PromptRecord(id=pid, category="c", prompt=text, source="test").to_dict()
                   for pid, text, _, _ in prompts]
        (model_dir / "prompts").mkdir(parents=True, exist_ok=True)
        (model_dir / "prompts" / "prompts.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
        rows = []
        for pid, _, base_level, fine_level in prompts:
            level = base_level if model == "base" else fine_level
            if level is None:
                continue
            image = f"images/{pid}_0.png"
            write_png(model_dir / "candidates" / image, level)
            rows.append(ManifestRow(prompt_id=pid, candidate=0, seed=seed, noise_sigma=0.0,
                                    image=image, latent=f"latents/{pid}_0.npy", scheduler="ddim",
                                    steps=2, cfg=7.5).to_dict())
        (model_dir / "candidates" / "manifest-00000-of-00001.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def png_writer():
    """write_png(path, level): a solid grey PNG."""
    return write_png


@pytest.fixture
def eval_workdir_maker():
    """make_eval_workdir(root, prompts): a fake eval workdir (see `make_eval_workdir`)."""
    return make_eval_workdir
