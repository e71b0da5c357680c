"""Orbax checkpoints for the training state: periodic saves, keep the latest N, resume, fall back.

A thin wrapper around `orbax.checkpoint.CheckpointManager` (V0 API) so moving to Orbax V1 later is
a one-file change. Every process calls `save` (Orbax coordinates the writes). Saves are atomic
(Orbax writes into a temporary directory and renames it; temporary directories left by a crash are
removed when the next run opens the directory), so a crash mid-save never corrupts the last
finished checkpoint. A checkpoint that fails to restore anyway is renamed `<step>.corrupt` (so that
the step is written again) with a one-line warning, and the previous one is used. A checkpoint of
another structure (the code or the config changed) is an error, never a fallback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fdistill import workdir as workdir_lib


class CheckpointMismatch(ValueError):
    """A readable checkpoint holds a state of another structure than the one asked for."""


def one_sentence(exc: BaseException, limit: int = 200) -> str:
    """The root cause of `exc` in one line: the innermost exception's type and first line (the
    outer ones of Orbax/TensorStore repeat it with pages of specs), without TensorStore's spec and
    source locations, and, when still long, its most specific (last) clauses."""
    root, seen = exc, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    text = (str(root).strip().splitlines() or [""])[0]
    text = re.sub(r"\s*\[(tensorstore_spec|source locations)=.*$", "", text)
    if len(text) > limit:
        clauses = text.split(": ")
        text = clauses.pop()
        while clauses and len(clauses[-1]) + len(text) + 2 <= limit:
            text = clauses.pop() + ": " + text
        text = "...: " + text[-limit:]
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


@contextlib.contextmanager
def _absl_silenced():
    """Orbax logs every failed read at ERROR (with the file's contents); the caller reports it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class _SecondaryReports(logging.Filter):
    """Drops the logs that repeat a failed save or restore: Orbax's background threads log each
    write that failed for lack of space (with a traceback), and asyncio logs every Orbax task whose
    error nobody retrieved when it is collected (one per array of a corrupt checkpoint). The
    training loop and `restore_latest` report the failure once, in a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        disk_full = workdir_lib.says_disk_full(message) or (exc is not None and workdir_lib.is_disk_full(exc))
        unretrieved_orbax_error = "exception was never retrieved" in message and "orbax" in message
        return not (disk_full or unretrieved_orbax_error)


def _quiet_orbax_failures() -> None:
    """Drops the secondary reports of a failed save or restore, once per process: the logs of
    `_SecondaryReports`, and the "Event loop is closed" errors of TensorStore reads that complete
    after Orbax closed the event loop of a failed restore (hundreds of unraisable-exception
    tracebacks for one corrupt checkpoint; any other unraisable exception is reported as before)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _SecondaryReports) for f in logger.filters):
            logger.addFilter(_SecondaryReports())
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loop", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_event_loop = True
    sys.unraisablehook = hook


def _tree_size(path: str) -> int:
    """Bytes of the files under `path`."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _shapes(tree: Any) -> dict[str, tuple]:
    """'a/b/c' leaf paths -> shapes (of arrays, ShapeDtypeStructs or Orbax array metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(getattr(x, "shape", np.shape(x)))
            for p, x in flat}


def _structure_differences(stored: dict, expected: dict) -> tuple[list[str], list[str]]:
    """(leaves of another shape, leaves missing on one side), described."""
    shapes = [f"{k}: stored {stored[k]}, expected {expected[k]}" for k in sorted(set(stored) & set(expected))
              if stored[k] != expected[k]]
    keys = [f"{k}: not in the checkpoint" for k in sorted(set(expected) - set(stored))]
    keys += [f"{k}: in the checkpoint only" for k in sorted(set(stored) - set(expected))]
    return shapes, keys


class Checkpointer:
    """Saves every `save_every` steps into `directory`, keeping the latest `keep`; with
    `save_every_secs` > 0 also when that much wall time has passed since the last save (or since
    the first `time_due` check, i.e. the first trained step: compiling does not count), so that a
    killed hour-long run loses minutes, not an eval interval."""

    def __init__(self, directory: str, keep: int = 2, save_every: int = 1000, save_every_secs: float = 0.0):
        self.directory = os.path.abspath(directory)
        self.save_every = int(save_every)
        self.save_every_secs = float(save_every_secs)
        self._last_save = None  # the clock starts at the first time_due()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True),
            item_handlers=ocp.StandardCheckpointHandler(),
        )
        _quiet_orbax_failures()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def time_due(self) -> bool:
        """True when `save_every_secs` > 0 and that much wall time has passed since the last save.
        Each process has its own clock: a multi-process loop must agree on it
        (`sharding.maxima_over_processes`)."""
        if self.save_every_secs <= 0:
            return False
        if self._last_save is None:
            self._last_save = time.monotonic()
        return time.monotonic() - self._last_save >= self.save_every_secs

    def save(self, step: int, state: Any) -> None:
        """Saves `state` at `step` (asynchronously); a step already on disk is left alone. Raises
        OSError(ENOSPC) before writing anything when the disk visibly lacks the space (the size of
        the latest checkpoint, or of the state plus 1 MiB): a save that fails half-way in Orbax's
        threads is reported later, noisily, and leaves a temporary directory behind."""
        steps = self.manager.all_steps()
        if step in steps:
            return
        usage = shutil.disk_usage(self.directory)
        need = _tree_size(os.path.join(self.directory, str(max(steps)))) if steps else (
            sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) + 2**20)
        short = bool(usage.total) and usage.free < need
        if jax.process_count() > 1:  # every process saves: all of them stop, or none
            from fdistill import sharding

            short = sharding.any_process(short)
        if short:
            raise OSError(errno.ENOSPC, f"saving step {step} needs about {need / 2**20:.2f} MiB, "
                          f"{usage.free / 2**20:.2f} MiB free", self.directory)
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._last_save = time.monotonic()

    def raise_if_failed(self) -> None:
        """Raises the error of a background save that failed (cheap; called every step)."""
        self.manager.check_for_errors()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s that carry the target `sharding`
        (restoring without explicit shardings fails across device counts). Returns (state, step),
        or None when there is no checkpoint. Unreadable checkpoints are renamed `<step>.corrupt`
        with a one-line warning each; a readable one of another structure raises CheckpointMismatch.
        """
        steps = self.all_steps()
        expected = _shapes(abstract_state)
        corrupt, restored = [], None
        for i, step in enumerate(reversed(steps)):
            stored = self._stored_shapes(step)
            shapes, keys = _structure_differences(stored, expected) if stored is not None else ([], [])
            if shapes:
                raise self._mismatch(step, shapes)
            try:
                with _absl_silenced():
                    restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state)), step
                break
            except Exception as e:  # noqa: BLE001 - any corruption: fall back to the previous step
                if keys:
                    raise self._mismatch(step, keys) from None
                corrupt.append(step)
                older = steps[-2 - i] if i + 1 < len(steps) else None
                then = f"falling back to the previous checkpoint (step {older})" if older is not None else \
                    "no older checkpoint left"
                print(f"WARNING: checkpoint {self.directory}/{step} is unreadable ({one_sentence(e)}); set aside as "
                      f"{step}.corrupt, {then}", flush=True)
        self._set_aside(corrupt)
        if restored is None and steps:
            raise RuntimeError(f"no checkpoint in {self.directory} could be restored (steps {steps}, now set aside as "
                               "<step>.corrupt); re-running starts from step 0")
        return restored

    def _stored_shapes(self, step: int) -> dict | None:
        """The leaf shapes recorded in the checkpoint's metadata, or None when it is unreadable."""
        try:
            with _absl_silenced():
                metadata = self.manager.item_metadata(step)
        except Exception:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
            return None
        return _shapes(metadata) if metadata is not None else None

    def _mismatch(self, step: int, differences: list[str]) -> CheckpointMismatch:
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        return CheckpointMismatch(
            f"checkpoint {self.directory}/{step} holds a training state of another structure than this run builds "
            f"({'; '.join(differences[:3])}{more}): the code or the config changed since it was written. Use a new "
            f"workdir, or {workdir_lib.STARTING_OVER}")

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to `<step>.corrupt` (process 0, after every process
        tried them) so that those steps are saved again."""
        if not steps:
            return
        multi = jax.process_count() > 1
        if multi:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fdistill_checkpoint_set_aside")
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst, n = f"{src}.corrupt", 1
                while os.path.exists(dst):  # set aside before: keep both
                    dst, n = f"{src}.corrupt.{n}", n + 1
                os.rename(src, dst)
        if multi:
            multihost_utils.sync_global_devices("fdistill_checkpoint_set_aside_done")
        self.manager.reload()

    def close(self, quiet: bool = False) -> None:
        """Waits for pending saves and closes; `quiet` (while another error is being raised)
        swallows a failed save's error instead of raising it a second time."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception:  # noqa: BLE001
            if not quiet:
                raise


def abstract_like(tree: Any, sharding) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `sharding` (one for every
    leaf, or a tree of them): the restore target."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, sharding)


def _open_read_only(directory: str) -> ocp.CheckpointManager:
    """A manager that reads any subtree of the checkpoints in `directory` and never writes there."""
    with _absl_silenced():  # "read only: setting save_interval_steps=0"
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
                                     item_handlers=ocp.PyTreeCheckpointHandler())


@dataclasses.dataclass(frozen=True)
class StoredTree:
    """The subtree `keys` (e.g. ('ema_params',)) of checkpoint `step` in `directory`, read only when
    it is placed: a frozen network of another run (teacher, reference or SFT policy, reward model).

    `abstract()` gives its shapes from the checkpoint's metadata (no array is read), so sharding
    rules apply before reading; `restore(shardings)` reads just this subtree with Orbax straight
    onto those shardings (each process reads the shards of its own devices: no device and no host
    holds a full copy of a sharded leaf); `numpy()` reads it to host NumPy (tools, tests).
    `dtype` casts its floating leaves on reading. An `Objective.frozen()` may return these in
    place of arrays (`fdistill.placement.on_mesh` restores them).
    """

    directory: str
    step: int
    keys: tuple[str, ...]
    dtype: Any = None

    @classmethod
    def latest(cls, workdir: str, candidates: tuple[tuple[str, ...], ...], dtype: Any = None) -> "StoredTree":
        """The first of `candidates` (key paths) that is a non-empty subtree of the latest checkpoint
        of `workdir` whose metadata reads."""
        directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory; is it a finished run's workdir?")
        manager = _open_read_only(directory)
        try:
            steps = sorted(manager.all_steps(), reverse=True)
            if not steps:
                raise FileNotFoundError(f"no checkpoint found under {directory}")
            for step in steps:
                try:
                    with _absl_silenced():
                        metadata = manager.item_metadata(step)
                except Exception as e:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
                    print(f"WARNING: checkpoint {directory}/{step} is unreadable ({one_sentence(e)}); trying an "
                          "older one", flush=True)
                    continue
                tree = getattr(metadata, "tree", metadata)
                for keys in candidates:
                    sub = _subtree(tree, keys)
                    if sub is not None and jax.tree.leaves(sub):
                        return cls(directory, step, tuple(keys), dtype)
                raise KeyError(f"checkpoint {directory}/{step} holds none of {['/'.join(k) for k in candidates]} "
                               f"(keys {sorted(tree)})")
        finally:
            manager.close()
        raise RuntimeError(f"no checkpoint under {directory} has readable metadata (steps {steps})")

    def _abstract(self, manager) -> Any:
        """ShapeDtypeStructs of the subtree from its metadata (after the `dtype` cast)."""
        with _absl_silenced():
            metadata = manager.item_metadata(self.step)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), self._dtype(m.dtype)),
                            _subtree(getattr(metadata, "tree", metadata), self.keys))

    def _dtype(self, stored) -> Any:
        stored = np.dtype(stored)
        return np.dtype(self.dtype) if self.dtype is not None and np.issubdtype(stored, np.floating) else stored

    def abstract(self) -> Any:
        """ShapeDtypeStructs of the subtree (after the `dtype` cast)."""
        manager = _open_read_only(self.directory)
        try:
            return self._abstract(manager)
        finally:
            manager.close()

    def restore(self, shardings: Any) -> Any:
        """The subtree as jax.Arrays on `shardings` (one for every leaf, or a tree of them)."""
        manager = _open_read_only(self.directory)
        try:
            abstract = abstract_like(self._abstract(manager), shardings)
            args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                               dtype=t.dtype), abstract)
            target, restore_args = _nest(abstract, self.keys), _nest(args, self.keys)
            try:
                with _absl_silenced():
                    restored = manager.restore(self.step, args=ocp.args.PyTreeRestore(
                        item=target, restore_args=restore_args, partial_restore=True))
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"checkpoint {self.directory}/{self.step} ({'/'.join(self.keys)}) is unreadable: "
                                   f"{one_sentence(e)}") from e
            return _subtree(restored, self.keys)
        finally:
            manager.close()

    def numpy(self) -> Any:
        """The subtree as host NumPy arrays."""
        return jax.tree.map(np.asarray, self.restore(jax.sharding.SingleDeviceSharding(jax.local_devices()[0])))


def _subtree(tree: Any, keys: tuple[str, ...]) -> Any:
    """tree[k0][k1]..., or None when a key is missing."""
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _nest(tree: Any, keys: tuple[str, ...]) -> dict:
    """{k0: {k1: ... tree}}."""
    for k in reversed(keys):
        tree = {k: tree}
    return tree


def restore_tree(workdir: str, step: int | None = None) -> dict:
    """The checkpointed state of a finished run as nested dicts of NumPy arrays (for teachers and
    reference policies; no target structure needed). Uses the latest readable step by default;
    never changes the other run's workdir."""
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
                with _absl_silenced():
                    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                                          manager.item_metadata(s))
                    restored = manager.restore(s, args=ocp.args.StandardRestore(target))
                return jax.tree.map(np.asarray, restored)
            except Exception as e:  # noqa: BLE001
                errors.append(f"step {s}: {one_sentence(e)}")
                print(f"WARNING: checkpoint {directory}/{s} is unreadable ({one_sentence(e)}); trying an older one",
                      flush=True)
    finally:
        manager.close()
    raise RuntimeError(f"no readable checkpoint under {directory}: {'; '.join(errors)}")
