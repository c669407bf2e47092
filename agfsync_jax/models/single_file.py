"""Single-file checkpoints (`model.path=/models/x.safetensors`) -> a cached diffusers folder.

Most SD1.x and SDXL downloads are one file in the original ("LDM") layout. It is converted
once by diffusers' own single-file loader (`StableDiffusionPipeline.from_single_file` or
`StableDiffusionXLPipeline.from_single_file`) and saved as a diffusers folder, which then loads
through the same path as any other folder (models.loading). The folder is keyed by the file's
identity (name, size, modification time), the configs used and the diffusers version, and
appears whole or not at all, so concurrent or interrupted runs never see half a conversion.

A single file holds weights only. The component configs, the tokenizers and the scheduler
config come from a local diffusers folder of the same architecture (`model.single_file_config`;
its weight files, if any, are not read), or else from the local Hugging Face cache of the
repository diffusers names for the checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5).
Nothing is downloaded: diffusers would fetch missing configs from the Hub even with
`local_files_only=True`, so it is only ever called with a local config folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agfsync_jax.models import weight_files

# What a single-file checkpoint is called; anything else at model.path must be a folder.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Written last into a finished conversion: what it was converted from.
RECORD = "single_file.json"
# WORKDIR/<this> holds conversions when model.single_file_cache is empty.
DEFAULT_CACHE = "base_model_converted"
_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be converted; the message names the file and why."""


def is_single_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix in SINGLE_FILE_SUFFIXES


def cache_root(model: Any, workdir: str | Path) -> Path:
    """Where conversions go: `model.single_file_cache`, or WORKDIR/base_model_converted."""
    return Path(model.single_file_cache or Path(workdir) / DEFAULT_CACHE)


def _config_files(config_dir: Path) -> Iterator[Path]:
    for path in sorted(config_dir.rglob("*")):
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES and not path.name.startswith("."):
            yield path


def _identity(checkpoint: Path, config_dir: Path) -> dict[str, Any]:
    import diffusers

    stat = checkpoint.stat()
    configs = hashlib.sha256()
    for path in _config_files(config_dir):
        configs.update(str(path.relative_to(config_dir)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"file": str(checkpoint.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "config_dir": str(config_dir.resolve()), "configs_sha256": configs.hexdigest(),
            "diffusers": diffusers.__version__}


class _LazyCheckpoint(Mapping):
    """The tensors of a safetensors file, read one by one on access (diffusers' model-type
    inference looks at a handful of keys; reading gigabytes for that would be waste)."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _hub_config(checkpoint: Path) -> Path:
    """The locally cached diffusers config repository diffusers associates with `checkpoint`."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt") as handle:
            repo = fetch_diffusers_config(_LazyCheckpoint(handle))["pretrained_model_name_or_path"]
    else:
        repo = fetch_diffusers_config(load_single_file_checkpoint(str(checkpoint), local_files_only=True))[
            "pretrained_model_name_or_path"]
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise SingleFileError(
            f"{checkpoint}: a single-file checkpoint; converting it needs the diffusers configs and "
            f"tokenizer of its architecture, which diffusers takes from {repo}, not in the local "
            f"Hugging Face cache. Set model.single_file_config to a local diffusers folder of the "
            f"same architecture (weights not needed: on a machine with network, `huggingface-cli "
            f"download {repo} --exclude '*.safetensors' '*.bin' '*.ckpt' '*.onnx' '*.msgpack' "
            f"--local-dir DIR`)") from e


def _pipeline_class(config_dir: Path) -> Any:
    import diffusers

    index = config_dir / "model_index.json"
    if not index.is_file():
        raise SingleFileError(f"{config_dir} (model.single_file_config) has no model_index.json: "
                              f"it must be a diffusers pipeline folder")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in _PIPELINES:
        raise SingleFileError(f"{index} names pipeline {name!r}; single files convert as one of "
                              f"{list(_PIPELINES)}")
    return getattr(diffusers, name)


def converted_folder(checkpoint: str | Path, root: str | Path, config_dir: str | Path = "") -> Path:
    """The diffusers folder converted from `checkpoint` under `root`; converts on first use.

    `config_dir`: a local diffusers folder of the checkpoint's architecture ("" = the local
    Hugging Face cache of the repository diffusers names for it).
    """
    checkpoint, root = Path(checkpoint), Path(root)
    if not checkpoint.is_file():
        raise SingleFileError(f"{checkpoint}: no such file (model.path)")
    damage = weight_files.describe_damage(checkpoint)
    if damage:
        raise weight_files.UnreadableWeightsError(f"{checkpoint}: {damage}")
    config_dir = Path(config_dir) if config_dir else _hub_config(checkpoint)
    if not config_dir.is_dir():
        raise SingleFileError(f"{config_dir} (model.single_file_config) is not a folder")
    identity = _identity(checkpoint, config_dir)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    out = root / f"{checkpoint.stem}-{key}"
    if (out / RECORD).is_file():
        return out

    pipeline_cls = _pipeline_class(config_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out.name}."))
    try:
        try:
            pipe = pipeline_cls.from_single_file(str(checkpoint), config=str(config_dir),
                                                 local_files_only=True)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise SingleFileError(
                f"{checkpoint}: diffusers' {pipeline_cls.__name__}.from_single_file could not "
                f"convert it with the configs of {config_dir} ({type(e).__name__}: {e}); check that "
                f"model.single_file_config has the checkpoint's architecture") from e
        staged = tmp / "pipeline"
        pipe.save_pretrained(staged, safe_serialization=True)
        (staged / RECORD).write_text(json.dumps(identity, indent=2) + "\n")
        try:
            staged.rename(out)
        except OSError:
            if not (out / RECORD).is_file():
                raise
            # Another process finished the same conversion first: use that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
