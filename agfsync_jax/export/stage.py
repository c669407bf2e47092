"""Stage `export`: WORKDIR/train checkpoint (export.step, -1 = latest) -> WORKDIR/export.

    agfsync-jax export --config=configs/tiny.py --workdir=DIR

Every process reads the parameters onto its host (the checkpoint holds every shard), and only
process 0 writes, so the folder is written once whatever mesh trained it. A finished export is
skipped while its inputs (the training run, the base model, `export.*`) are unchanged, and
redone when they changed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from agfsync_jax import base_model, done_marker, fingerprint, storage, workdir as workdir_lib
from agfsync_jax.errors import MissingInputError
from agfsync_jax.storage import PathLike

PIPELINE_DIR = "pipeline"
LORA_DIR = "lora"  # a LoRA run's adapters, for pipe.load_lora_weights(WORKDIR/export/lora)
# export.* fields that do not change what is exported: none today.
IGNORED: tuple[str, ...] = ()


def settings(config: Any, workdir: PathLike) -> dict[str, Any]:
    train_marker = done_marker.read(storage.as_path(workdir) / workdir_lib.TRAIN)
    if train_marker is None:
        raise MissingInputError(f"{storage.as_path(workdir) / workdir_lib.TRAIN}: training has not finished; run the "
                                "`train` stage first")
    # The LoRA and EMA settings decide what a checkpoint holds and how it becomes a UNet.
    return {**fingerprint.config_settings(config, ("export",), IGNORED), **base_model.model_identity(config),
            "train.lora": config.train.lora.to_dict(), "train.ema_decay": float(config.train.ema_decay),
            "inputs.train": train_marker.get(done_marker.FINGERPRINT, train_marker.get("step"))}


def _save_lora(adapters: Any, unet_config: dict[str, Any], out: PathLike, scale: float) -> None:
    """The adapters as diffusers-format LoRA safetensors: written locally, then moved or uploaded whole."""
    from agfsync_jax import lora

    with tempfile.TemporaryDirectory(prefix="agfsync-lora-") as tmp:
        local = Path(tmp) / LORA_DIR
        lora.save_diffusers_lora(adapters, unet_config, local, scale)
        storage.publish_folder(local, out)


def run(config: Any, workdir: str) -> dict[str, Any]:
    wd = storage.as_path(workdir)
    out = wd / workdir_lib.EXPORT
    current = settings(config, wd)
    marker = done_marker.read(out)
    redone = ""
    if marker is not None:
        changed = done_marker.changed_fields(marker, current)
        if not changed:
            print(f"export: complete ({marker['pipeline']}), skipped")
            return marker
        # The export is derived from the checkpoint alone: redoing it is always safe.
        redone = f" (redone: {', '.join(changed[:4])} changed)"
        done_marker.clear(out)

    import jax

    from agfsync_jax import lora
    from agfsync_jax.export.pipeline_export import export_flax_msgpack, export_pipeline, trained_unet
    from agfsync_jax.training import checkpointing

    field = "ema_params" if float(config.train.ema_decay) > 0 and bool(config.export.use_ema) else "params"
    step, values = checkpointing.read_checkpoint(checkpointing.checkpoint_dir(wd),
                                                 None if config.export.step < 0 else int(config.export.step), (field,))
    base = base_model.resolve_base_model(config, wd)
    params, adapters = trained_unet(config, base, values[field])
    pipeline_dir = out / PIPELINE_DIR
    summary = {"step": step, "base": str(base), "pipeline": str(pipeline_dir), "weights": field}
    if adapters is not None:
        summary["lora"] = str(out / LORA_DIR)
    if jax.process_index() == 0:
        # A previous attempt died after a rename (or, on gs://, during an upload) but before the
        # marker: the folders may be of another step, or partial, so rewrite them.
        for stale in (pipeline_dir, out / LORA_DIR):
            if stale.exists():
                storage.rmtree(stale)
        export_pipeline(base, params, pipeline_dir, variant=config.model.variant)
        if adapters is not None:
            _save_lora(adapters, storage.read_json(storage.as_path(base) / "unet" / "config.json"), out / LORA_DIR,
                       lora.adapter_scale(int(config.train.lora.rank), float(config.train.lora.alpha)))
        if config.export.flax_msgpack:
            summary["flax_unet"] = str(export_flax_msgpack(base, params, out / "flax_unet"))
        done_marker.write(out, summary, current)
    print(f"export: step {step} -> {pipeline_dir}{redone}")
    return summary
