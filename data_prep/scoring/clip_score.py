"""CLIP score (Hessel et al. 2021; AGFSync Eq. 3 with gamma = 100) from a local CLIP folder.

    clip(image, text) = 100 * cos(E_image, E_text)

E are CLIP's *projected* embeddings (`get_image_features` / `get_text_features`), L2-normalised.
The paper uses openai/clip-vit-base-patch16; the authors' released code uses ViT-L/14 and cuts
the prompt to 77 *characters* (docs/design.md section 10). Here the prompt is cut by *tokens*: the
tokenizer truncates the words to max_position_embeddings - 2 and still appends the end-of-text
token, because CLIP pools the sentence embedding at that token.

How this differs from torchmetrics' `CLIPScore` given the same model and processor:

* Prompts shorter than 77 tokens: identical per-sample values (tested to 1e-4).
* Longer prompts: torchmetrics tokenizes without truncation and then slices `input_ids` to the
  first 77 positions, which cuts off the end-of-text token. transformers' CLIP text model then
  pools at the wrong position: with a current config (eos_token_id = 49407) at the *first*
  position holding the EOS id, and as there is none, at position 0 (the start token, the same
  vector for every prompt); with a legacy config (eos_token_id = 2) at the arg-max token id,
  i.e. whichever word of the first 77 tokens has the largest id. Either way its "text
  embedding" of a long prompt is not a sentence embedding. We keep the EOS token, so a long
  prompt scores like its first 75 tokens.
* torchmetrics' `compute()` returns max(mean score, 0); we do not clamp. A negative cosine is
  rare for real CLIP models, and clamping would turn distinct bad candidates into ties, which
  matters when the score is used to rank candidates rather than to report a mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.scoring.scorer import Scorer, ScoringItem, batches


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is not a directory (expected a local model folder)")
    return path


class ClipEmbedder:
    """A CLIP model folder: projected, L2-normalised image and text embeddings (float32)."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype,
                 processor_path: str | Path | None = None, batch_size: int = 16, what: str = "CLIP"):
        from transformers import CLIPModel, CLIPProcessor

        self.path = _require_dir(path, what)
        processor_dir = _require_dir(processor_path or path, f"{what} processor")
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.model = CLIPModel.from_pretrained(self.path, dtype=dtype).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_dir)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        eos = self.processor.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{what}: the tokenizer in {processor_dir} has no end-of-text token")
        self.eos_token_id = int(eos)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids truncated to the model's context, the end-of-text token kept."""
        enc = self.processor.tokenizer(list(texts), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
        last = enc["attention_mask"].sum(dim=1) - 1
        last_ids = enc["input_ids"][torch.arange(len(texts)), last]
        if not bool((last_ids == self.eos_token_id).all()):
            # A tokenizer without an EOS post-processor would make CLIP pool at a word.
            raise ValueError(f"tokenizer of {self.path} does not end sequences with the "
                             f"end-of-text token {self.eos_token_id}")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for sl in batches(len(texts), self.batch_size):
            enc = self.tokenize(texts[sl])
            feats = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                 attention_mask=enc["attention_mask"].to(self.device))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros((0, self.model.config.projection_dim))

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for sl in batches(len(images), self.batch_size):
            pixels = self.processor.image_processor(images=list(images[sl]), return_tensors="pt")
            feats = self.model.get_image_features(
                pixel_values=pixels["pixel_values"].to(self.device, self.dtype))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros((0, self.model.config.projection_dim))

    def cosine(self, items: Sequence[ScoringItem]) -> np.ndarray:
        """cos(E_image, E_text) per item, float64."""
        images = self.image_embeddings([it.image for it in items])
        texts = self.text_embeddings([it.text for it in items])
        return (images * texts).sum(dim=-1).double().numpy()


class ClipScorer(Scorer):
    """100 x cosine of CLIP's projected, normalised image and prompt embeddings."""

    name = "clip"

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype, batch_size: int = 16):
        self.embedder = ClipEmbedder(path, device, dtype, batch_size=batch_size, what="scoring.clip_path")

    @property
    def version(self) -> str:
        return f"clip:{self.embedder.path.name}"

    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        return 100.0 * self.embedder.cosine(items)
