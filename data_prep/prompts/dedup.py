"""Near-duplicate removal: embedding cosine when a model folder is configured, else lexical.

Greedy and order-preserving: an item is dropped when it is at least `threshold` similar to an
earlier item that was kept, so the result does not depend on anything but the input order.
The lexical measure is the Jaccard similarity of character-trigram sets of the normalised
text (robust to plural/tense changes), computed with sparse matrix products so thousands of
prompts take well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import scipy.sparse

_ROW_BLOCK = 512
# Below this many texts, plain set arithmetic beats building sparse matrices (question lists).
_SMALL = 64


def normalize_text(text: str) -> str:
    """Lower case, alphanumerics only, single spaces: what 'the same text' means here."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def trigrams(text: str) -> set[str]:
    padded = f" {normalize_text(text)} "
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


class _TrigramSets:
    """Texts as a sparse binary [n, vocab] matrix of their character trigrams."""

    def __init__(self, texts: Sequence[str]):
        vocab: dict[str, int] = {}
        rows, cols = [], []
        for i, text in enumerate(texts):
            for gram in trigrams(text):
                rows.append(i)
                cols.append(vocab.setdefault(gram, len(vocab)))
        self.matrix = scipy.sparse.csr_matrix(
            (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(texts), max(len(vocab), 1)))
        self.sizes = np.asarray(self.matrix.sum(axis=1)).ravel()

    def jaccard(self, rows: slice, cols: slice) -> np.ndarray:
        inter = (self.matrix[rows] @ self.matrix[cols].T).toarray()
        union = self.sizes[rows][:, None] + self.sizes[cols][None, :] - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float32)


def lexical_similarity(a: str, b: str) -> float:
    """Trigram Jaccard similarity of two texts, in [0, 1]."""
    return float(_TrigramSets([a, b]).jaccard(slice(0, 1), slice(1, 2))[0, 0])


class EmbeddingModel:
    """Mean-pooled, L2-normalised token embeddings of a transformers encoder in a folder."""

    def __init__(self, path: str, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                       truncation=True, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, 1), np.float32)


class NearDuplicateFilter:
    """`keep(texts)` -> indices of the texts to keep, in order."""

    def __init__(self, threshold: float, embedding_model_path: str = ""):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.measure = "embedding" if embedding_model_path else "lexical"
        self.embedder = EmbeddingModel(embedding_model_path) if embedding_model_path else None

    def keep(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        # Identical normalised texts are duplicates under any measure (and any threshold).
        first_of: dict[str, int] = {}
        candidates = [i for i, t in enumerate(texts)
                      if first_of.setdefault(normalize_text(t), i) == i]
        unique = [texts[i] for i in candidates]
        if self.embedder is None and len(unique) <= _SMALL:
            grams = [trigrams(t) for t in unique]
            kept_small: list[int] = []
            for i, g in enumerate(grams):
                if all(len(g & grams[j]) < self.threshold * len(g | grams[j]) for j in kept_small):
                    kept_small.append(i)
            return [candidates[i] for i in kept_small]
        if self.embedder is None:
            sets = _TrigramSets(unique)
            similarity = sets.jaccard
        else:
            emb = self.embedder.embed(unique)
            similarity = lambda rows, cols: emb[rows] @ emb[cols].T  # noqa: E731
        kept = np.zeros(len(unique), bool)
        # Row blocks against every earlier item: memory stays O(block * n), not O(n^2).
        for start in range(0, len(unique), _ROW_BLOCK):
            stop = min(start + _ROW_BLOCK, len(unique))
            sims = similarity(slice(start, stop), slice(0, stop))
            for i in range(start, stop):
                kept[i] = not np.any(sims[i - start, :i][kept[:i]] >= self.threshold)
        return [candidates[i] for i in np.flatnonzero(kept)]
