"""Orbax checkpoints of the train state and the input pipeline's position.

    ckpt = Checkpointer(checkpoint_dir(workdir), save_every=100, keep=3)
    if ckpt.latest_step() is not None:
        state, data_position = ckpt.restore(ckpt.latest_step(), abstract_state)

    step, unet_params = load_params(checkpoint_dir(workdir))   # export: host numpy, any machine

Each checkpoint has two items: "state" (the TrainState: step, params, optimizer state, RNG key,
skipped-step count; saved sharded, restored onto whatever shardings the abstract state carries)
and "meta" (JSON: the data position and a fingerprint of every state field). Saving is async; a
checkpoint directory appears only once complete, so a process killed mid-save leaves the previous
checkpoint as the latest.

A restore that fails, or whose values do not match the fingerprint saved with them, raises
`CheckpointRestoreError` with the reason. Nothing here ever falls back to the base weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from agfsync_jax import storage, workdir as workdir_lib
from agfsync_jax.storage import Path, PathLike

STATE = "state"
META = "meta"
CHECKPOINTS = "checkpoints"  # under WORKDIR/train


class CheckpointRestoreError(RuntimeError):
    """A checkpoint exists but cannot be restored; the message says which and why."""


def _leaf_fingerprint(x: Any, xp: Any) -> Any:
    """[sum |x|, sum x * w] with pseudo-random weights w in [-0.5, 0.5) from integer hashing
    (bit-identical in numpy and XLA), so a changed, zeroed or permuted value shows."""
    x = xp.ravel(x).astype(xp.float32)
    index = xp.arange(x.shape[0], dtype=xp.uint32)
    weights = ((index * xp.uint32(2654435761)) >> xp.uint32(8)).astype(xp.float32) / 2.0**24 - 0.5
    return xp.stack([xp.sum(xp.abs(x)), xp.sum(x * weights)])


def _tree_fingerprint(tree: Any, xp: Any) -> Any:
    """Sum of the leaf fingerprints: independent of how a reader's containers order leaves."""
    return sum((_leaf_fingerprint(x, xp) for x in jax.tree_util.tree_leaves(tree)), xp.zeros(2, xp.float32))


@jax.jit
def state_fingerprint(state: Any) -> dict[str, jax.Array]:
    """{field: [sum |x|, sum x * w]} for every field of the train state, computed on the mesh.

    Orbax does not verify what it reads back (a damaged compressed block can decode to other
    numbers without an error); comparing this against the value saved with the checkpoint
    does, up to summation order (a restore onto another mesh sums in another order).
    """
    return {f.name: _tree_fingerprint(getattr(state, f.name), jnp) for f in dataclasses.fields(state)}


def _fingerprint_matches(saved: Any, restored: Any) -> bool:
    saved, restored = np.asarray(saved, np.float32), np.asarray(restored, np.float32)
    # Summation-order error is bounded by a small multiple of eps * sum |x|.
    return saved.shape == restored.shape == (2,) and bool(
        np.all(np.abs(saved - restored) <= 1e-5 * (abs(saved[0]) + 1.0)))


def _first_line(e: Exception) -> str:
    """The gist of an error: TensorStore appends a page-long spec to its messages."""
    line = (str(e).strip().splitlines() or [""])[0]
    return line.split(" See full TensorStore details")[0][:300]


def _refusal(step_dir: Path) -> str:
    return (f"Refusing to start over from the base weights: delete {step_dir} to continue from an "
            "earlier checkpoint.")


def _verify(where: str, step_dir: Path, saved: dict[str, Any], restored: dict[str, Any]) -> None:
    # A field that checkpoints from before it existed lack (ema_params) was empty: zeros.
    bad = [k for k in restored if not _fingerprint_matches(saved.get(k, [0.0, 0.0]), restored[k])]
    if bad:
        raise CheckpointRestoreError(
            f"{where}: restored {', '.join(bad)} do not match the fingerprint saved with them (the "
            f"checkpoint's array data is corrupted). {_refusal(step_dir)}")


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` that knows our two items."""

    def __init__(self, directory: PathLike, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every={save_every} and keep_checkpoints={keep} must be >= 1")
        self.directory = storage.absolute(directory)
        self.save_every = save_every
        # We decide when to save (`should_save`): orbax's own interval policy also saves the
        # first step of every run, which would put an off-schedule checkpoint after each resume.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, META))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state: Any, data_position: dict[str, Any]) -> bool:
        """Starts an async save of `state` at `step`; returns whether a save was started."""
        fingerprint = jax.device_get(state_fingerprint(state))
        meta = {"data_position": data_position, "step": int(step),
                "fingerprint": {k: np.asarray(v).tolist() for k, v in fingerprint.items()}}
        return self._manager.save(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, data position) of checkpoint `step`, placed as `abstract_state`'s shardings."""
        where = f"checkpoint step {step} in {self.directory}"
        step_dir = self.directory / str(step)
        if step not in self._manager.all_steps():
            raise CheckpointRestoreError(f"{where}: no such checkpoint (have {self.all_steps()})")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001 - any failure is re-raised with its cause attached
            raise CheckpointRestoreError(f"{where} cannot be restored ({type(e).__name__}: "
                                         f"{_first_line(e)}). {_refusal(step_dir)}") from e
        state, meta = restored[STATE], restored[META]
        if not isinstance(meta, dict) or not {"data_position", "fingerprint", "step"} <= set(meta):
            raise CheckpointRestoreError(f"{where}: its '{META}' item is missing or malformed: {meta!r}. "
                                         f"{_refusal(step_dir)}")
        _verify(where, step_dir, meta["fingerprint"], jax.device_get(state_fingerprint(state)))
        if int(meta["step"]) != int(step) or int(state.step) != int(step):
            raise CheckpointRestoreError(
                f"{where}: holds state of step {int(state.step)} and metadata of step {meta['step']}")
        return state, meta["data_position"]

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def read_checkpoint(directory: PathLike, step: int | None = None,
                    fields: tuple[str, ...] = ("params",)) -> tuple[int, dict[str, Any]]:
    """(step, {field: host numpy tree}) of a checkpoint's train state, e.g. for export.

    `fields` are TrainState fields (params, opt_state, rng, step, nonfinite_steps); only those
    are read, onto the host, so this works on any machine whatever mesh wrote the checkpoint.
    `step=None` takes the latest. Raises `CheckpointRestoreError` when there is no such
    checkpoint, it cannot be read, or what it read does not match the fingerprint saved with it.
    """
    directory = storage.absolute(directory)
    checkpointer = Checkpointer(directory, save_every=1, keep=1, async_save=False)
    try:
        steps = checkpointer.all_steps()
    finally:
        checkpointer.close()
    if step is None or step < 0:
        if not steps:
            raise CheckpointRestoreError(f"{directory}: no checkpoint to load")
        step = max(steps)
    if step not in steps:
        raise CheckpointRestoreError(f"{directory}: no checkpoint of step {step} (have {sorted(steps)})")
    item = directory / str(step) / STATE
    where = f"checkpoint step {step} in {directory}"
    reader = ocp.PyTreeCheckpointer()
    try:
        tree = reader.metadata(item).item_metadata.tree
        missing = [f for f in fields if f not in tree]
        if missing:
            raise KeyError(f"no fields {missing} in the saved state (has {sorted(tree)})")
        target = {f: jax.tree_util.tree_map(lambda m: np.zeros((), m.dtype), tree[f]) for f in fields}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        values = reader.restore(item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
            directory / str(step) / META, args=ocp.args.JsonRestore())
    except Exception as e:  # noqa: BLE001 - re-raised with the checkpoint named
        raise CheckpointRestoreError(f"{where} cannot be read ({type(e).__name__}: {_first_line(e)})") from e
    _verify(where, directory / str(step), meta.get("fingerprint", {}),
            {f: _tree_fingerprint(values[f], np) for f in fields})
    return step, {f: values[f] for f in fields}


def load_params(directory: PathLike, step: int | None = None) -> tuple[int, Any]:
    """(step, UNet parameters as host numpy arrays): what export and evaluation need."""
    step, values = read_checkpoint(directory, step, ("params",))
    return step, values["params"]


def checkpoint_dir(workdir: PathLike) -> Path:
    """WORKDIR/train/checkpoints."""
    return storage.as_path(workdir) / workdir_lib.TRAIN / CHECKPOINTS
