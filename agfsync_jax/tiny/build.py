"""Saving a tiny base model folder, optionally pretrained, with a record of how it was built.

    save_tiny_pipeline("sd1", out, seed=0, pretraining=Pretraining(300, 64, 1e-3))

The folder appears whole or not at all (in a gs:// folder: it is built locally and uploaded, the
build record last), and carries `tiny_model.json` (the settings that decide
its weights), so that a cached folder built with other settings is refused (`check_build`)
instead of silently reused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile
from typing import Any

from agfsync_jax import storage
from agfsync_jax.errors import ConfigError
from agfsync_jax.storage import Path, PathLike

BUILD_RECORD = "tiny_model.json"


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """How the tiny UNet is pretrained (`agfsync_jax.tiny.pretrain`); defaults live in the config."""

    steps: int
    batch_size: int
    learning_rate: float

    @classmethod
    def from_config(cls, model: Any) -> "Pretraining | None":
        """From `config.model.tiny_pretrain_*`; None when `tiny_pretrain_steps` is 0."""
        if not model.tiny_pretrain_steps:
            return None
        return cls(int(model.tiny_pretrain_steps), int(model.tiny_pretrain_batch_size),
                   float(model.tiny_pretrain_learning_rate))


def build_record(family: str, seed: int, pretraining: Pretraining | None = None) -> dict[str, Any]:
    """The fields that decide a tiny model's weights (the pretraining ones only when it is pretrained)."""
    record: dict[str, Any] = {"family": family, "seed": int(seed),
                              "pretrain_steps": pretraining.steps if pretraining else 0}
    if pretraining:
        record.update(pretrain_batch_size=pretraining.batch_size, pretrain_learning_rate=pretraining.learning_rate)
    return record


def save_tiny_pipeline(family: str, out: PathLike, seed: int = 0, safetensors: bool = True,
                       pretraining: Pretraining | None = None) -> Path | pathlib.Path:
    """Builds and saves a tiny pipeline; the folder appears whole or not at all.

    With `pretraining` the UNet is first pretrained into a denoiser of synthetic latents
    (`agfsync_jax.tiny.pretrain`) and saved as safetensors whatever `safetensors` says.
    """
    from agfsync_jax.tiny.pipeline import build_tiny_pipeline

    out = storage.as_path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="agfsync-tiny-") as tmp:
            local = save_tiny_pipeline(family, storage.as_path(tmp) / out.name, seed, safetensors, pretraining)
            record = (local / BUILD_RECORD).read_bytes()
            (local / BUILD_RECORD).unlink()
            storage.copy_tree(local, out)
            storage.write_bytes(out / BUILD_RECORD, record)  # last: its presence means complete
        return out
    record = build_record(family, seed, pretraining)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        final = tmp / "random"
        build_tiny_pipeline(family, seed).save_pretrained(final, safe_serialization=safetensors)
        if pretraining:
            from agfsync_jax.export.pipeline_export import export_pipeline
            from agfsync_jax.models import loading
            from agfsync_jax.tiny import pretrain

            params, losses = pretrain.pretrain_unet(
                loading.load_stable_diffusion(final), steps=pretraining.steps, batch_size=pretraining.batch_size,
                learning_rate=pretraining.learning_rate, seed=seed)
            record["pretrain_loss_first_last"] = [losses[0], losses[-1]]
            final = export_pipeline(final, params, tmp / "pretrained")
        (final / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        final.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pathlib.Path(out)  # local callers get the pathlib.Path they always got (epath has no `**` glob)


def read_build(folder: PathLike) -> dict[str, Any]:
    """The build record of a tiny model folder; folders from before it existed hold random UNets."""
    path = storage.as_path(folder) / BUILD_RECORD
    return json.loads(path.read_text()) if path.is_file() else {"pretrain_steps": 0, "legacy": True}


def check_build(folder: PathLike, expected: dict[str, Any]) -> None:
    """Raises `ConfigError` if the tiny model in `folder` was built with other settings than `expected`."""
    folder = storage.as_path(folder)
    found = read_build(folder)
    legacy = found.get("legacy", False)
    for key in ("pretrain_steps",) if legacy else tuple(expected):
        if found.get(key) != expected[key]:
            where = f"no {BUILD_RECORD}" if legacy else str(folder / BUILD_RECORD)
            raise ConfigError(f"{folder} holds a tiny model built with {key}={found.get(key)!r} ({where}), but "
                              f"the config asks for {expected[key]!r}: remove {folder} to rebuild it, or use "
                              "another workdir")
