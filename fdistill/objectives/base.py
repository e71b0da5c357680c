"""The contract between an objective and the one training loop (`fdistill.train`).

An objective is a small object built from the experiment config. The loop owns everything else
(mesh, data placement, jit, logging, checkpoints, evaluation cadence, NaN checks, results.json).

    @register("score")
    class ScoreObjective(Objective):
        def __init__(self, config): ...
        def frozen(self) -> pytree of frozen parameters           # optional; default {}
        def init_state(self, key, frozen) -> state                # pure, jitted by the loop
        def train_step(self, state, frozen, batch) -> (state, metrics)   # pure, jitted by the loop
        def batch(self, step, process_index, process_count) -> dict of numpy arrays
        def evaluate(self, state, frozen, key) -> dict of floats

Conventions:
  * `state` is a pytree (a `flax.struct.dataclass`) with an integer `step` field; it is placed on
    the mesh by `config.mesh`'s sharding rules, checkpointed and donated to the step.
    `init_state(key, frozen)` must be a pure function of its arguments: the loop runs
    `jax.jit(init_state, out_shardings=...)` on shapes first (`jax.eval_shape`), so the state is
    created already sharded and no device holds a full copy of a sharded leaf. A state that starts
    from a frozen network (DMD2's generator, a DPO policy) copies it from `frozen`, not from a
    Python attribute (which would be baked into the program as a constant).
  * `frozen()` is a pytree of frozen parameters (teacher, reference policy), as host or device
    arrays or, for another run's checkpoint, `checkpoint.StoredTree`s (`runs.stored_params`) that
    Orbax reads straight onto their shardings; the loop places it on its shardings and passes it as an argument (never closed over as
    a constant), never donated, never checkpointed.
  * `batch(step, ...)` returns this process's slice of the global batch for `step`; the global batch
    must be a deterministic function of (config, step) only, so runs on any number of devices or
    processes follow the same trajectory and a resumed run sees the same data.
  * Randomness inside the step comes from `jax.random.fold_in(state.rng, state.step)`.
  * `metrics` is a flat dict of scalar arrays; training rows must contain `loss`.
  * `evaluate` may keep results that do not change during a run in `self.cache` (set by the loop).
  * An objective whose training reads an evaluation field (`config.eval.*`) lists it in
    `trajectory_fields`, so that a resumed run cannot change it (see `fdistill.workdir`).

Adding an objective means adding one module under `fdistill/objectives/` (auto-discovered) and one
config file with `config.objective = '<name>'`.
"""
from __future__ import annotations

import abc
import importlib
import pkgutil
from typing import Any, Callable

import numpy as np

from fdistill import placement
from fdistill.configs import ConfigError
from fdistill.evaluation.cache import ResultCache

Pytree = Any

_REGISTRY: dict[str, type] = {}
_FAMILY: dict[str, str] = {}


def register(name: str, family: str | None = None) -> Callable[[type], type]:
    """Decorator registering an `Objective` (or a factory `config -> Objective`) under `name`, the
    value of `config.objective`. `family` names the config base it reads (`fdistill.configs.base`;
    default: `name`), e.g. a new distillation method registers with `family='distill'`."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"objective {name!r} registered twice ({_REGISTRY[name]} and {cls})")
        _REGISTRY[name] = cls
        _FAMILY[name] = family or name
        cls.name = name
        return cls

    return deco


def family(name: str) -> str:
    """The config family of objective `name`; unknown names list the allowed ones."""
    _discover()
    if name not in _FAMILY:
        raise ConfigError(f"config.objective={name!r} is not a known objective; allowed: {sorted(_REGISTRY)}")
    return _FAMILY[name]


def _discover() -> None:
    """Imports every module in `fdistill.objectives` so that their `@register` calls run."""
    import fdistill.objectives as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"fdistill.objectives.{info.name}")


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def build(config) -> "Objective":
    """Builds the objective named by `config.objective`; unknown names list the allowed ones. The
    FID Inception weights named by `config.eval.inception_weights` are set up first (checked to exist)."""
    _discover()
    name = config.get("objective", None)
    if name not in _REGISTRY:
        raise ConfigError(
            f"config.objective={name!r} is not a known objective; allowed: {sorted(_REGISTRY)}"
        )
    if "eval" in config and config.eval.get("inception_weights"):
        from fdistill.evaluation import fid

        fid.configure_inception(config.eval.inception_weights)
    return _REGISTRY[name](config)


class Objective(abc.ABC):
    """Base class: see the module docstring for the contract."""

    name: str = "?"
    # Config fields outside the usual training sections that this objective's training reads, in
    # `fdistill.workdir`'s dotted names ('eval.num_steps'): a resumed run must keep them (by default
    # `eval.*` fields only change the evaluation and may change on resume).
    trajectory_fields: tuple[str, ...] = ()
    # Keys of `frozen()` that only `init_state` reads (the starting parameters of a fine-tuning run):
    # the loop places them to create the state, then drops them, so they hold no device memory
    # while training (and are never passed to `train_step`).
    init_only: tuple[str, ...] = ()
    # Where `evaluate` may keep results that are pure functions of their inputs (a frozen teacher's
    # sample metrics): None = in memory only; the training loop sets one that also keeps them in the
    # workdir's `cache/` (`fdistill.evaluation.cache`), so a resumed run reuses them.
    cache: ResultCache | None = None

    def __init__(self, config):
        self.config = config

    def frozen(self) -> Pytree:
        """The frozen networks' parameters ({} when there are none): host arrays, or
        `checkpoint.StoredTree`s of other runs' checkpoints, which the loop restores straight onto
        their shardings (`placement.on_mesh`; `placement.frozen_on_host` reads them to host)."""
        return {}

    @abc.abstractmethod
    def init_state(self, key, frozen: Pytree) -> Pytree:
        """A fresh train state; pure and jittable (see the module docstring)."""

    def init(self, key) -> tuple[Pytree, Pytree]:
        """`(state, frozen)` of a fresh run on the default device (tests, tools); the training loop
        creates them on the mesh instead (`fdistill.placement.on_mesh`)."""
        frozen = placement.frozen_on_host(self.frozen())
        return self.init_state(key, frozen), frozen

    @abc.abstractmethod
    def train_step(self, state: Pytree, frozen: Pytree, batch: dict) -> tuple[Pytree, dict]:
        """One pure update; the loop jits it with state donated."""

    @abc.abstractmethod
    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch for `step` (leading axis = batch)."""

    @abc.abstractmethod
    def evaluate(self, state: Pytree, frozen: Pytree, key) -> dict[str, float]:
        """Final/periodic evaluation metrics (flat dict of Python floats)."""

    def plot(self, state: Pytree, frozen: Pytree, plot_dir: str, step: int) -> list[str]:
        """Optionally writes figures into `plot_dir`; returns the paths written."""
        return []
