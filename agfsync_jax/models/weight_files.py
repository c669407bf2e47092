"""Finding and reading a component's PyTorch weights in a diffusers-format folder.

Upstream Flax `from_pretrained(from_pt=True)` looks only for `.bin` files; real SD folders are
often safetensors-only. This module reads either (and sharded safetensors) into numpy arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Preferred first: safetensors needs no PyTorch and cannot execute code on load.
_SINGLE_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
_INDEX_FILES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
)


class WeightsNotFoundError(FileNotFoundError):
    pass


def find_weight_files(component_dir: Path) -> list[Path]:
    for name in _SINGLE_FILES:
        if (component_dir / name).is_file():
            return [component_dir / name]
    for name in _INDEX_FILES:
        index = component_dir / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (component_dir / s).is_file()]
            if missing:
                raise WeightsNotFoundError(f"{index}: shard files missing: {missing}")
            return [component_dir / s for s in shards]
    raise WeightsNotFoundError(
        f"{component_dir}: no weights file (looked for {', '.join(_SINGLE_FILES + _INDEX_FILES)})")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    # framework="numpy" cannot represent bfloat16 checkpoints; "flax" can, and we upcast them.
    with safe_open(str(path), framework="flax") as f:
        for key in f.keys():
            tensor = np.asarray(f.get_tensor(key))
            out[key] = tensor.astype(np.float32) if tensor.dtype.name == "bfloat16" else tensor
    return out


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading .bin weights needs PyTorch (pip install torch)") from e
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def read_state_dict(component_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a component folder as numpy arrays, keyed by PyTorch parameter name."""
    component_dir = Path(component_dir)
    state: dict[str, np.ndarray] = {}
    for path in find_weight_files(component_dir):
        part = _read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)
        state.update(part)
    return state
