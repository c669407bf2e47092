"""Where the scorers run: cuda with float16 when a GPU is present, cpu with float32 otherwise.

float16 halves the memory of BLIP-2 FlanT5-XXL (about 12 B parameters) so it fits one GPU; on CPU
float16 matmuls are slow or unsupported, hence float32 there.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def select_device(requested: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Returns (device, dtype) for `requested` in DEVICES; "cuda" without a GPU is an error."""
    if requested not in DEVICES:
        raise ValueError(f"scoring.device is {requested!r}; expected one of {DEVICES}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("scoring.device is 'cuda' but torch sees no CUDA device")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32
