"""Finding and reading a component's PyTorch weights in a diffusers-format folder.

Upstream Flax `from_pretrained(from_pt=True)` looks only for `.bin` files; real SD folders are
often safetensors-only. This module reads either, single or sharded (an index json), and
diffusers' variant files (`diffusion_pytorch_model.fp16.safetensors` for variant "fp16") into
numpy arrays.

A file that cannot be weights is named with what it looks like (empty, truncated, an HTML error
page, a git-lfs pointer) instead of a parser's "header too large"; a tensor holding NaN or
infinity is named at load, before it can turn every sample into noise.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

# Preferred first: safetensors needs no PyTorch and cannot execute code on load.
SINGLE_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
INDEX_FILES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin.index.json",
)
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# How much of a file's start is enough to recognise a pointer, a web page or a text file.
_SNIFF_BYTES = 512


class WeightsNotFoundError(FileNotFoundError):
    pass


class UnreadableWeightsError(ValueError):
    """A weights file that cannot be read; the message names it and what it looks like."""


class NonFiniteWeightsError(ValueError):
    """A tensor holds NaN or infinite values; the message names the file and the tensor."""


def variant_name(name: str, variant: str) -> str:
    """diffusers' variant naming: "model.safetensors" + "fp16" -> "model.fp16.safetensors"
    ("x.safetensors.index.json" -> "x.safetensors.index.fp16.json")."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _variants_present(component_dir: Path) -> list[str]:
    """The variants ("" for none) whose weight files are in the folder, for error messages."""
    if not component_dir.is_dir():
        return []
    names = {p.name for p in component_dir.iterdir() if p.is_file()}
    found = set()
    for name in names:
        guess = name.split(".")[-2] if name.count(".") >= 2 else ""
        for known in SINGLE_FILES + INDEX_FILES:
            if name == known:
                found.add("")
            elif guess and name == variant_name(known, guess):
                found.add(guess)
    return sorted(found)


def find_weight_files(component_dir: Path, variant: str = "") -> list[Path]:
    """The weight files of a component: one file, or the shards its index json names."""
    singles = [variant_name(n, variant) for n in SINGLE_FILES]
    indexes = [variant_name(n, variant) for n in INDEX_FILES]
    for name in singles:
        if (component_dir / name).is_file():
            return [component_dir / name]
    for name in indexes:
        index = component_dir / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise UnreadableWeightsError(
                    f"{index}: not a weights index (want JSON with a 'weight_map'): {e}") from e
            missing = [s for s in shards if not (component_dir / s).is_file()]
            if missing:
                raise WeightsNotFoundError(f"{index}: shard files missing: {missing}")
            return [component_dir / s for s in shards]
    present = _variants_present(component_dir)
    hint = ""
    if present:
        shown = ", ".join(repr(v) if v else "'' (none)" for v in present)
        hint = (f"; the folder has weights of variant {shown}: set model.variant to one of them "
                f"(--config.model.variant=...)")
    wanted = f"variant {variant!r} " if variant else ""
    raise WeightsNotFoundError(
        f"{component_dir}: no {wanted}weights file (looked for {', '.join(singles + indexes)})"
        f"{hint}")


def describe_damage(path: Path) -> str | None:
    """What a weights file that cannot be weights looks like; None when nothing is wrong on
    its face (a cheap look at the start and, for safetensors, the header's sizes)."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (zero bytes): the download or copy did not finish; fetch the file again"
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(_LFS_POINTER):
        return (f"is a git-lfs pointer ({size} bytes), not the weights: run `git lfs pull` in "
                f"the repository it came from (or download the file itself)")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return (f"is an HTML page ({size} bytes), not weights: the download saved an error or "
                f"login page; download it again (gated models need a token)")
    if path.suffix == ".safetensors":
        return _safetensors_damage(path, size, head)
    if path.suffix == ".bin" and head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return (f"is truncated ({size} bytes): a PyTorch zip archive without its end record; "
                f"fetch the file again")
    return None


def _looks_like_text(head: bytes) -> bool:
    return all(32 <= b < 127 or b in b"\t\r\n" for b in head)


def _safetensors_damage(path: Path, size: int, head: bytes) -> str | None:
    if _looks_like_text(head):
        return (f"is a text file ({size} bytes, starts {head[:60]!r}), not safetensors; fetch "
                f"the file again")
    if size < 8:
        return f"is truncated ({size} bytes, shorter than a safetensors header)"
    (header_len,) = struct.unpack("<Q", head[:8])
    if 8 + header_len > size:
        return (f"is truncated or not safetensors: its header claims {header_len} bytes but the "
                f"file has {size}; fetch the file again")
    with path.open("rb") as f:
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        return "has a damaged header (not the JSON safetensors writes); fetch the file again"
    expected = 8 + header_len + end
    if size < expected:
        return (f"is truncated: {size} of {expected} bytes ({100 * size / expected:.0f}%); "
                f"fetch the file again")
    return None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        # framework="numpy" cannot represent bfloat16 checkpoints; "flax" can, and we upcast them.
        with safe_open(str(path), framework="flax") as f:
            for key in f.keys():
                tensor = np.asarray(f.get_tensor(key))
                out[key] = tensor.astype(np.float32) if tensor.dtype.name == "bfloat16" else tensor
    except SafetensorError as e:
        raise UnreadableWeightsError(f"{path}: cannot be read as safetensors ({e}); fetch the "
                                     f"file again") from e
    return out


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading .bin weights needs PyTorch (pip install torch)") from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise UnreadableWeightsError(f"{path}: cannot be read as a PyTorch checkpoint "
                                     f"({type(e).__name__}: {e}); fetch the file again") from e
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def check_finite(state: dict[str, np.ndarray], path: Path) -> None:
    """Raises NonFiniteWeightsError naming the first tensor with NaN or infinite values.

    One float64 sum per tensor: it is finite exactly when every element is (no finite
    checkpoint comes near float64's range), and needs no boolean copy of the weights.
    """
    for key, tensor in state.items():
        if not np.issubdtype(tensor.dtype, np.floating) or np.isfinite(
                np.sum(tensor, dtype=np.float64)):
            continue
        nan, inf = int(np.isnan(tensor).sum()), int(np.isinf(tensor).sum())
        raise NonFiniteWeightsError(
            f"{path}: tensor {key!r} {tuple(tensor.shape)} holds {nan} NaN and {inf} infinite "
            f"values of {tensor.size}: the checkpoint is damaged (or was saved after training "
            f"diverged); use another copy")


def read_state_dict(component_dir: str | Path, variant: str = "") -> dict[str, np.ndarray]:
    """All tensors of a component folder as numpy arrays, keyed by PyTorch parameter name.

    Raises WeightsNotFoundError, UnreadableWeightsError or NonFiniteWeightsError, each naming
    the file.
    """
    component_dir = Path(component_dir)
    state: dict[str, np.ndarray] = {}
    for path in find_weight_files(component_dir, variant):
        damage = describe_damage(path)
        if damage:
            raise UnreadableWeightsError(f"{path}: {damage}")
        part = _read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)
        check_finite(part, path)
        state.update(part)
    return state
