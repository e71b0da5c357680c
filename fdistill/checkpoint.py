"""Orbax checkpoints for the training state: periodic saves, keep the latest N, resume, fall back.

A thin wrapper around `orbax.checkpoint.CheckpointManager` (V0 API) so moving to Orbax V1 later is
a one-file change. Every process calls `save` (Orbax coordinates the writes). Saves are atomic
(Orbax writes into a temporary directory and renames it), so a crash mid-save never corrupts the
last finished checkpoint; a checkpoint that fails to restore anyway is skipped with a warning and
the previous one is used.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves every `save_every` steps into `directory`, keeping the latest `keep`."""

    def __init__(self, directory: str, keep: int = 2, save_every: int = 1000):
        self.directory = os.path.abspath(directory)
        self.save_every = int(save_every)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any) -> None:
        """Saves `state` at `step` (asynchronously); a step already on disk is left alone."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s that carry the target `sharding`
        (restoring without explicit shardings fails across device counts). Returns (state, step),
        or None when there is no checkpoint. Unreadable checkpoints are skipped with a warning.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                return state, step
            except Exception as e:  # noqa: BLE001 - any corruption: fall back to the previous step
                msg = f"checkpoint {self.directory}/{step} could not be restored ({type(e).__name__}: {e}); "
                msg += "falling back to the previous checkpoint" if step != steps[0] else "no older checkpoint left"
                log.warning(msg)
                print(f"WARNING: {msg}", flush=True)
        if steps:
            raise RuntimeError(f"no checkpoint in {self.directory} could be restored (steps {steps})")
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, sharding) -> Any:
    """ShapeDtypeStructs of `tree` carrying `sharding` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def restore_tree(workdir: str, step: int | None = None) -> dict:
    """The checkpointed state of a finished run as nested dicts of NumPy arrays (for teachers and
    reference policies; no target structure needed). Uses the latest readable step by default."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory; is it a finished run's workdir?")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers=ocp.StandardCheckpointHandler())
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint found under {directory}")
    # An explicit single-device target: the saved shardings name the devices of the saving run
    # ("Topology mismatch" when the device or process count differs, e.g. a multi-process run).
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    errors = []
    try:
        for s in steps:
            try:
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                                      manager.item_metadata(s))
                restored = manager.restore(s, args=ocp.args.StandardRestore(target))
                return jax.tree.map(np.asarray, restored)
            except Exception as e:  # noqa: BLE001
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                print(f"WARNING: checkpoint {directory}/{s} could not be restored; trying an older one", flush=True)
    finally:
        manager.close()
    raise RuntimeError(f"no readable checkpoint under {directory}: {errors}")
