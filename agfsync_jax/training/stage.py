"""Stage `train`: Diffusion-DPO finetuning of the UNet on WORKDIR/pairs -> WORKDIR/train.

    agfsync-jax train --config=configs/tiny.py --workdir=DIR

A finished run is skipped while its settings are unchanged; raising `train.steps` continues it
from its latest checkpoint, as does re-running an interrupted one. Changing anything else that
decides the weights (loss, learning rate, model, the pairs) with checkpoints present stops with
the changed fields named: mixing two configurations in one run would be neither.
"""

from __future__ import annotations

import math
from typing import Any

from agfsync_jax import base_model, done_marker, fingerprint, storage, workdir as workdir_lib
from agfsync_jax.errors import MissingInputError, StageChangedError
from agfsync_jax.storage import Path, PathLike

# Fields that change how a run is logged, saved or laid out on devices, not the weights it reaches.
IGNORED = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.nonfinite") + base_model.COVERED_BY_IDENTITY
# Where the settings of the run in progress are kept, so that a resume can be checked against them.
SETTINGS_FILE = "settings.json"
# Changing these continues the run rather than invalidating it.
CONTINUABLE = ("train.steps",)


def settings(config: Any, workdir: PathLike) -> dict[str, Any]:
    pairs = done_marker.read(storage.as_path(workdir) / workdir_lib.PAIRS)
    if pairs is None:
        raise MissingInputError(f"{storage.as_path(workdir) / workdir_lib.PAIRS}: no finished pair dataset; run the "
                                "`score` stage first (or `encode` for an external dataset)")
    return {**fingerprint.config_settings(config, ("seed", "model", "train"), IGNORED),
            **base_model.model_identity(config),
            "inputs.pairs": pairs.get(done_marker.FINGERPRINT, pairs.get("pairs"))}


def _check_run_in_progress(train_dir: Path, current: dict[str, Any], workdir: Path) -> None:
    """Refuses to resume checkpoints made with other settings; records the settings otherwise."""
    path = train_dir / SETTINGS_FILE
    if path.is_file():
        changed = [f for f in fingerprint.changed_fields(storage.read_json(path), current)
                   if f not in CONTINUABLE]
        if changed:
            raise StageChangedError(
                f"train: the checkpoints in {train_dir} were made with other settings ({', '.join(changed[:8])} "
                f"changed); {done_marker.redo_hint('train', workdir)}")
    storage.write_json(path, current)


def run(config: Any, workdir: str) -> dict[str, Any]:
    wd = storage.as_path(workdir)
    train_dir = wd / workdir_lib.TRAIN
    current = settings(config, wd)
    marker = done_marker.read(train_dir)
    if marker is not None:
        changed = done_marker.changed_fields(marker, current)
        if not changed:
            print(f"train: complete at step {marker['step']}, skipped ({done_marker.path(train_dir)})")
            return marker
        if set(changed) - set(CONTINUABLE):
            done_marker.check("train", train_dir, current, wd)  # raises, naming the fields
        print(f"train: continuing from step {marker['step']} to train.steps={config.train.steps}", flush=True)
    # Import JAX only now: joining the process group must precede any use of a device.
    import jax

    from agfsync_jax import distributed
    from agfsync_jax.training import train

    distributed.initialize()
    if jax.process_index() == 0:
        _check_run_in_progress(train_dir, current, wd)
        done_marker.clear(train_dir)
    summary = train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        done_marker.write(train_dir, summary, current)
    # Losses without a preference (sft) have no implicit accuracy.
    acc = (f", implicit accuracy {summary['implicit_acc']:.3f}"
           if math.isfinite(summary.get("implicit_acc", float("nan"))) else "")
    print(f"train: step {summary['step']}, loss {summary.get('loss', float('nan')):.4f}{acc}, "
          f"{summary['nonfinite_steps']} non-finite steps skipped; checkpoint {summary['checkpoint']}")
    return summary
