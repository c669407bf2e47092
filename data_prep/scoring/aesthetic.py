"""Aesthetic score: the LAION aesthetic head on CLIP ViT-L/14 image embeddings, rescaled to 0-100.

`scoring.aesthetic = "laion"`. A stand-in for VILA: the paper (and the authors' code) scores
aesthetics with VILA (Ke et al. 2023), which has no PyTorch port; it runs here in TensorFlow
(vila.py, `scoring.aesthetic = "vila"`, the default). This is the standard PyTorch substitute,
the LAION aesthetic predictor v2 ("improved aesthetic predictor",
sac+logos+ava1-l14-linearMSE.pth): a stack of Linear layers (768-1024-128-64-16-1, dropout
between them and no activations, so an affine map) over the L2-normalised, projected CLIP
ViT-L/14 image embedding. The numbers are therefore not VILA's.

Scale: the head regresses mean AVA ratings, whose nominal range is 1 (worst) to 10 (best). We map
that range linearly onto 0-100, like the other scores:

    aesthetic = 100 * (rating - 1) / (10 - 1)        1 -> 0,  5.5 -> 50,  10 -> 100

(`rating_to_0_100`). The map is not clipped: a rating outside 1-10 (rare for the real head,
whose ratings of real images sit around 4-7) lands outside 0-100 rather than tying with the
end of the scale, since ties carry no preference when candidates are ranked. The head runs in
float64 on the CPU (it is tiny), so the rescaled score keeps the embedding's precision.

The weights file holds a state dict whose Linear layers are `layers.<i>.weight/bias` (the
original's nn.Sequential numbering, dropouts included); `.pth`/`.pt` (torch pickle, loaded with
weights_only) and `.safetensors` files are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_prep.scoring.clip_score import ClipEmbedder
from data_prep.scoring.scorer import Scorer, ScoringItem

# The nominal range of the AVA ratings the LAION head regresses; mapped onto 0-100.
AVA_RATING_MIN, AVA_RATING_MAX = 1.0, 10.0
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def rating_to_0_100(rating: np.ndarray | float) -> np.ndarray:
    """AVA rating (nominally 1-10) -> 0-100, linearly and unclipped: 100 (r - 1) / 9."""
    r = np.asarray(rating, dtype=np.float64)
    return 100.0 * (r - AVA_RATING_MIN) / (AVA_RATING_MAX - AVA_RATING_MIN)


def load_head_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scoring.aesthetic_head_path: {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        return state
    raise ValueError(f"{path}: unknown weights format {path.suffix!r} (expected .pth, .pt, .bin or .safetensors)")


class AestheticHead(nn.Module):
    """The affine MLP of the LAION aesthetic predictor, shaped by the weights it is given."""

    def __init__(self, layer_shapes: Sequence[tuple[int, int]], indices: Sequence[int]):
        super().__init__()
        # Keep the original Sequential indices so the state dict keys match the file's.
        modules: list[nn.Module] = []
        for pos in range(max(indices) + 1):
            if pos in indices:
                out_dim, in_dim = layer_shapes[list(indices).index(pos)]
                modules.append(nn.Linear(in_dim, out_dim))
            else:
                modules.append(nn.Identity())  # dropout at inference
        self.layers = nn.Sequential(*modules)

    @property
    def input_dim(self) -> int:
        return next(m for m in self.layers if isinstance(m, nn.Linear)).in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_file(cls, path: str | Path) -> "AestheticHead":
        state = load_head_state_dict(path)
        found: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            m = _LAYER_KEY.match(key)
            if not m:
                raise ValueError(f"{path}: unexpected key {key!r} (expected layers.<i>.weight/bias)")
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
        if not found:
            raise ValueError(f"{path}: no layers.<i>.weight entries")
        indices = sorted(found)
        shapes = []
        for i in indices:
            if set(found[i]) != {"weight", "bias"} or found[i]["weight"].ndim != 2:
                raise ValueError(f"{path}: layers.{i} needs a 2-D weight and a bias")
            shapes.append(tuple(found[i]["weight"].shape))
        for (out_prev, _), (_, in_next), i in zip(shapes, shapes[1:], indices[1:]):
            if out_prev != in_next:
                raise ValueError(f"{path}: layers.{i} takes {in_next} inputs but the previous layer gives {out_prev}")
        if shapes[-1][0] != 1:
            raise ValueError(f"{path}: the last layer must have 1 output, has {shapes[-1][0]}")
        head = cls(shapes, indices)
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return head.eval()


class AestheticScorer(Scorer):
    """rating_to_0_100(LAION aesthetic head(normalised CLIP ViT-L/14 image embedding)); a
    stand-in for the paper's VILA (see the module docstring)."""

    name = "aesthetic"

    def __init__(self, clip_path: str | Path, head_path: str | Path, device: torch.device,
                 dtype: torch.dtype, batch_size: int = 16):
        # A full CLIP folder (the text tower is loaded but unused): CLIPVisionModelWithProjection
        # would read projection_dim from the vision sub-config, where CLIP folders do not store it.
        self.embedder = ClipEmbedder(clip_path, device, dtype, batch_size=batch_size,
                                     what="scoring.aesthetic_clip_path")
        self.head_path = Path(head_path)
        # float64 on the CPU: the embeddings come back there, and the head is a few small matmuls.
        self.head = AestheticHead.from_file(self.head_path).double()
        projection_dim = self.embedder.model.config.projection_dim
        if self.head.input_dim != projection_dim:
            raise ValueError(f"{self.head_path} expects {self.head.input_dim}-d embeddings but "
                             f"{self.embedder.path} projects to {projection_dim}")

    @property
    def version(self) -> str:
        return f"laion-aesthetic:{self.head_path.name}:{self.embedder.path.name}"

    @torch.no_grad()
    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        if not items:
            return np.zeros((0,))
        embeds = self.embedder.image_embeddings([it.image for it in items])
        return rating_to_0_100(self.head(embeds.double())[:, 0].numpy())
