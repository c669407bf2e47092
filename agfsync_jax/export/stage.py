"""Stage `export`: WORKDIR/train checkpoint (export.step, -1 = latest) -> WORKDIR/export.

    agfsync-jax export --config=configs/tiny.py --workdir=DIR

Every process reads the parameters onto its host (the checkpoint holds every shard), and only
process 0 writes, so the folder is written once whatever mesh trained it. A finished export is
skipped while its inputs (the training run, the base model, `export.*`) are unchanged, and
redone when they changed.
"""

from __future__ import annotations

from typing import Any

from agfsync_jax import base_model, done_marker, fingerprint, storage, workdir as workdir_lib
from agfsync_jax.errors import MissingInputError
from agfsync_jax.storage import PathLike

PIPELINE_DIR = "pipeline"
# export.* fields that do not change what is exported: none today.
IGNORED: tuple[str, ...] = ()


def settings(config: Any, workdir: PathLike) -> dict[str, Any]:
    train_marker = done_marker.read(storage.as_path(workdir) / workdir_lib.TRAIN)
    if train_marker is None:
        raise MissingInputError(f"{storage.as_path(workdir) / workdir_lib.TRAIN}: training has not finished; run the "
                                "`train` stage first")
    return {**fingerprint.config_settings(config, ("export",), IGNORED), **base_model.model_identity(config),
            "inputs.train": train_marker.get(done_marker.FINGERPRINT, train_marker.get("step"))}


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

    from agfsync_jax.export.pipeline_export import export_flax_msgpack, export_pipeline
    from agfsync_jax.training import checkpointing

    step, params = checkpointing.load_params(checkpointing.checkpoint_dir(wd),
                                             None if config.export.step < 0 else int(config.export.step))
    base = base_model.resolve_base_model(config, wd)
    pipeline_dir = out / PIPELINE_DIR
    summary = {"step": step, "base": str(base), "pipeline": str(pipeline_dir)}
    if jax.process_index() == 0:
        if pipeline_dir.exists():
            # A previous attempt died after the rename (or, on gs://, during the upload) but
            # before the marker: the folder may be of another step, or partial, so rewrite it.
            storage.rmtree(pipeline_dir)
        export_pipeline(base, params, pipeline_dir, variant=config.model.variant)
        if config.export.flax_msgpack:
            summary["flax_unet"] = str(export_flax_msgpack(base, params, out / "flax_unet"))
        done_marker.write(out, summary, current)
    print(f"export: step {step} -> {pipeline_dir}{redone}")
    return summary
