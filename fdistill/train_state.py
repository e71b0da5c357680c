"""The one update path of every objective: train state, optimiser, clipping, EMA, accumulation, rng.

An objective writes its losses and how they combine; everything after the gradient lives here:

    opt = Optimizer(OptimizerSettings.from_config(config.train))      # one per trained network
    state = create_state(params, opt, rng)                            # or dicts {name: params/opt}
    key = step_key(state)                                             # fold_in(state.rng, state.step)
    loss, grads = value_and_grad(loss_fn, state.params, inputs, num_micro=k)
    state, metrics = apply_gradients(state, grads, opt)               # optax + clip + EMA + norms
    state = state.replace(step=state.step + 1)

Several networks with their own optimisers (a generator and its critics) keep `params`,
`opt_state` and `ema_params` as dicts keyed by network name; `apply_gradients(state, grads, opts)`
then updates exactly the networks named in `grads` (critic and generator updates of one step are
two calls). Metrics are `grad_norm`, `param_norm`, `update_norm` (global L2 norms; suffixed
`/<name>` per network).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fdistill.configs import ConfigError

Pytree = Any
DROPOUT_SALT = 0xD20  # fold_in salt of the dropout key (independent of the objective's own draws)


@flax.struct.dataclass
class TrainState:
    """What a train step carries and a checkpoint stores.

    `params` are the trained parameters (one tree, or {network: tree}); `opt_state` the optax
    states (same keys); `ema_params` their exponential moving averages where a network has
    `ema_decay > 0` (None otherwise); `extra` objective state that gradients do not train
    (e.g. f-distill's running ratio-bin means; {} when unused).
    """

    step: jax.Array
    rng: jax.Array
    params: Pytree
    opt_state: Pytree
    ema_params: Pytree
    extra: Pytree = flax.struct.field(default_factory=dict)


LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with linear warm-up, then a constant learning rate or a cosine decay to 0 at
    `num_steps` (`lr_schedule`), global-norm clipping (0 = none) and a parameter EMA (0 = none)."""

    learning_rate: float
    lr_schedule: str = "constant"
    num_steps: int = 0
    warmup_steps: int = 0
    grad_clip: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    ema_decay: float = 0.0

    @classmethod
    def from_config(cls, train_config, updates_per_step: int = 1, **overrides) -> "OptimizerSettings":
        """The settings named in `config.train` (fields of this class), with `overrides` (None values
        are ignored, so an unset per-network option falls back to `config.train`). An optimiser that
        steps `updates_per_step` times per training step (a distillation critic, DDPO's inner updates)
        gets `num_steps` and `warmup_steps` scaled by it, so that its schedule counts training steps."""
        values = {f.name: train_config[f.name] for f in dataclasses.fields(cls) if f.name in train_config}
        for field in ("num_steps", "warmup_steps"):
            if field in values:
                values[field] = int(values[field]) * int(updates_per_step)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"warmup_steps, grad_clip and weight_decay must be >= 0, got {self}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not known; allowed: {list(LR_SCHEDULES)}")
        if self.lr_schedule != "constant" and self.num_steps <= self.warmup_steps:
            raise ValueError(f"a {self.lr_schedule} learning-rate schedule needs num_steps > warmup_steps, "
                             f"got {self.num_steps} and {self.warmup_steps}")

    @property
    def decays(self) -> bool:
        """Whether the learning rate depends on `num_steps` (which then fixes the trajectory)."""
        return self.lr_schedule != "constant"

    def schedule(self):
        """The learning rate as a function of the update count (an optax schedule or a float)."""
        s = self.learning_rate
        if self.lr_schedule == "cosine":
            s = optax.cosine_decay_schedule(s, self.num_steps - self.warmup_steps)
        if self.warmup_steps:
            s = optax.join_schedules([optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps),
                                      s if callable(s) else optax.constant_schedule(s)], [self.warmup_steps])
        return s


class Optimizer:
    """One network's optax transformation and EMA rate, built from `OptimizerSettings`."""

    def __init__(self, settings: OptimizerSettings):
        self.settings = settings
        s = settings
        parts = [optax.clip_by_global_norm(s.grad_clip)] if s.grad_clip else []
        parts.append(optax.adamw(s.schedule(), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay))
        self.tx = optax.chain(*parts)

    @property
    def ema_decay(self) -> float:
        return self.settings.ema_decay

    def init(self, params: Pytree) -> Pytree:
        return self.tx.init(params)

    def step(self, params, opt_state, ema, grads) -> tuple[Pytree, Pytree, Pytree, dict]:
        """(params, opt_state, ema, metrics) after one update with `grads`."""
        updates, opt_state = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = ema_update(ema, new_params, self.ema_decay)
        metrics = {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(new_params),
                   "update_norm": optax.global_norm(updates)}
        return new_params, opt_state, ema, metrics


def ema_update(ema: Pytree, params: Pytree, decay: float) -> Pytree:
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def _copy(tree: Pytree) -> Pytree:
    return jax.tree.map(jnp.array, tree)


def create_state(params: Pytree, optimizer: Optimizer | Mapping[str, Optimizer], rng: jax.Array,
                 extra: Pytree | None = None) -> TrainState:
    """A fresh state; with a dict of optimisers, `params` is a dict with the same keys."""
    if isinstance(optimizer, Optimizer):
        opt_state = optimizer.init(params)
        ema = _copy(params) if optimizer.ema_decay > 0 else None
    else:
        _check_groups(params, optimizer)
        opt_state = {k: optimizer[k].init(params[k]) for k in params}
        ema = {k: (_copy(params[k]) if optimizer[k].ema_decay > 0 else None) for k in params}
    return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, params=params, opt_state=opt_state, ema_params=ema,
                      extra={} if extra is None else extra)


def _check_groups(params, optimizers) -> None:
    if not isinstance(params, Mapping) or set(params) - set(optimizers):
        raise ValueError(f"params must be a dict whose keys have optimisers; params "
                         f"{sorted(params) if isinstance(params, Mapping) else type(params)}, optimisers {sorted(optimizers)}")


def apply_gradients(state: TrainState, grads: Pytree, optimizer: Optimizer | Mapping[str, Optimizer]
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update of the networks in `grads` (all of `params` for a single optimiser; the
    named subset for a dict of optimisers). Does not advance `state.step`."""
    if isinstance(optimizer, Optimizer):
        params, opt_state, ema, metrics = optimizer.step(state.params, state.opt_state, state.ema_params, grads)
        return state.replace(params=params, opt_state=opt_state, ema_params=ema), metrics
    params, opt_state, ema = dict(state.params), dict(state.opt_state), dict(state.ema_params)
    metrics = {}
    for name, g in grads.items():
        params[name], opt_state[name], ema[name], m = optimizer[name].step(params[name], opt_state[name], ema[name], g)
        metrics.update({f"{k}/{name}": v for k, v in m.items()})
    return state.replace(params=params, opt_state=opt_state, ema_params=ema), metrics


def eval_params(state: TrainState, name: str | None = None, use_ema: bool = True) -> Pytree:
    """The parameters to sample or evaluate with: the EMA where there is one (and `use_ema`)."""
    params = state.params if name is None else state.params[name]
    ema = state.ema_params if name is None else state.ema_params[name]
    return ema if (use_ema and ema is not None) else params


# ----- randomness ---------------------------------------------------------------------------------


def step_key(state: TrainState) -> jax.Array:
    """The randomness of the step: fold_in(state.rng, state.step) (DESIGN principle 1)."""
    return jax.random.fold_in(state.rng, state.step)


def dropout_rngs(key: jax.Array) -> dict[str, jax.Array]:
    """Flax `rngs` for dropout, derived from the step key without disturbing the objective's draws."""
    return {"dropout": jax.random.fold_in(key, DROPOUT_SALT)}


# ----- gradient accumulation ----------------------------------------------------------------------


def micro_batch(tree: Pytree, index: int, num: int) -> Pytree:
    """Rows index, index+num, index+2num, ... of every leaf: a strided split keeps each micro-batch
    spread evenly over the devices of a batch sharded on its leading axis (no resharding)."""
    return jax.tree.map(lambda x: x[index::num], tree)


def value_and_grad(loss_fn: Callable, params: Pytree, inputs: Pytree, num_micro: int = 1, has_aux: bool = False):
    """`jax.value_and_grad(loss_fn, has_aux)(params, inputs)`, over `num_micro` equal micro-batches.

    `loss_fn(params, inputs)` must be a mean over the leading axis of `inputs`, so the mean of the
    micro-batch values and gradients equals the full-batch ones (aux metrics are averaged too).
    The loop is unrolled in Python (conv gradients inside lax.scan are ~20x slower on CPU).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
    if num_micro == 1:
        return grad_fn(params, inputs)
    total = None
    for i in range(num_micro):
        out = grad_fn(params, micro_batch(inputs, i, num_micro))
        total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)
    return jax.tree.map(lambda a: a / num_micro, total)


def check_grad_accum(num_micro: int, batch_size: int) -> int:
    """`config.train.grad_accum_steps`, checked against the global batch size."""
    if num_micro < 1 or batch_size % num_micro:
        raise ConfigError(f"config.train.grad_accum_steps={num_micro} must be >= 1 and divide "
                         f"config.train.batch_size={batch_size}")
    return num_micro
