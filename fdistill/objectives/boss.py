"""BOSS: Bellman optimal step-size straightening of a flow-matching model (arXiv 2312.16414).

Given a pretrained velocity field v (a finished `flow` run; any network teacher converts, see
`fdistill.flow`) and a budget of N Euler steps (`distill.num_student_steps`):

1. Reference trajectories: from noise z, the teacher's ODE dx/dt = v(x, t) on a fine uniform grid
   1 = t_0 > t_1 > ... > t_M = 0 (`distill.boss_fine_steps`, Heun), giving x_{t_j} and v_j = v(x_{t_j}, t_j).
2. Cost of one Euler step from fine point j to a later point i (its local truncation error):
       c(j, i) = E_z || x_{t_i} - (x_{t_j} + (t_i - t_j) v_j) ||^2        (mean over features),
   over `distill.boss_cost_samples` trajectories.
3. Bellman's dynamic programme: the cheapest path 0 = j_0 < j_1 < ... < j_N = M of exactly N steps,
       C_k(i) = min_{j < i} C_{k-1}(j) + c(j, i),   C_0 = [0, inf, ...],
   with back-pointers (`plan`). Its times t_{j_0} > ... > t_{j_N} are the BOSS schedule.
4. Straightening (refinement): the student starts as the teacher and regresses, on a pool of
   reference trajectories (`distill.boss_pool_size`, kept at the schedule's times only; BOSS too
   trains on a dataset generated once by the pretrained model), each chosen step's secant
       L = E_z mean_k || v_theta(x_{t_{j_k}}, t_{j_k}) - (x_{t_{j_{k+1}}} - x_{t_{j_k}}) / (t_{j_{k+1}} - t_{j_k}) ||^2,
   so that N Euler steps on the schedule land on the teacher's fine trajectory.

The schedule and the pool are computed in `init_state` (a pure, jitted function of the frozen
teacher and the run's key) and kept in `state.extra` ('indices', 'times', 'pool', 'pool_labels'),
so a checkpoint carries them. (Computing the trajectories in every step instead costs 2M teacher
evaluations per update: 1 update/s on the mixture with M = 200.) The evaluation reports
the refined student on the BOSS schedule (the run's row), and the teacher with N uniform Euler
steps (`uniform/...`) and with the BOSS schedule only (`schedule/...`), plus the schedule itself
(`boss_t<k>`). For an EDM teacher the grid starts at t_max = sigma_max / (1 + sigma_max) < 1
(where its conversion to a velocity is defined), for a velocity network at t = 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import data as data_lib
from fdistill import flow
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.denoiser import VelocityDenoiser
from fdistill.distillation import evaluation, teachers
from fdistill.evaluation.samples import MIN_EVAL_SAMPLES
from fdistill.objectives.base import Objective, register

SCHEDULE_SALT = 0xB055  # fold_in salt of the step-size search's trajectories


def plan(cost: jax.Array, num_steps: int) -> jax.Array:
    """Bellman's dynamic programme over a cost matrix [M + 1, M + 1] (cost[j, i] of one step from
    grid point j to i > j; other entries are ignored): the N + 1 increasing indices 0 = j_0 < ... <
    j_N = M of the cheapest path with exactly N steps (module docstring, step 3)."""
    m1 = cost.shape[0]
    if not 1 <= num_steps <= m1 - 1:
        raise ValueError(f"the step budget {num_steps} must be between 1 and the fine grid's {m1 - 1} steps")
    j, i = jnp.meshgrid(jnp.arange(m1), jnp.arange(m1), indexing="ij")
    step_cost = jnp.where(j < i, cost, jnp.inf)  # [from j, to i]
    best = jnp.full((m1,), jnp.inf).at[0].set(0.0)

    def relax(best, _):
        total = best[:, None] + step_cost  # [j, i]
        return jnp.min(total, axis=0), jnp.argmin(total, axis=0)

    _, back = jax.lax.scan(relax, best, None, length=num_steps)  # back[k][i]: predecessor of i at step k+1

    def backtrack(i, k):
        prev = back[k][i]
        return prev, prev

    _, path = jax.lax.scan(backtrack, jnp.asarray(m1 - 1), jnp.arange(num_steps - 1, -1, -1))
    return jnp.concatenate([jnp.flip(path), jnp.array([m1 - 1])]).astype(jnp.int32)


def reference_trajectories(velocity, z: jax.Array, times: jax.Array):
    """Heun on `times` (decreasing to 0) from x = z: the states x_{t_j} [M + 1, B, ...] and the
    velocities v_j at the first M of them [M, B, ...] (Euler for the last step, as `flow.sample`)."""
    def step(x, ts_pair):
        x_next, v = flow.ode_step(velocity, x, ts_pair[0], ts_pair[1], "heun")
        return x_next, (x_next, v)

    _, (xs, vs) = jax.lax.scan(step, z, (times[:-1], times[1:]))
    return jnp.concatenate([z[None], xs]), vs


def step_costs(xs: jax.Array, vs: jax.Array, times: jax.Array) -> jax.Array:
    """c(j, i) = mean over trajectories and features of (x_i - x_j - (t_i - t_j) v_j)^2, [M + 1, M + 1]
    (rows j = M and entries i <= j are unused)."""
    m1 = xs.shape[0]

    def row(j):
        jump = (times - times[j]).reshape((m1,) + (1,) * (xs.ndim - 1))
        err = xs - xs[j][None] - jump * vs[jnp.minimum(j, m1 - 2)][None]
        return jnp.mean(err**2, axis=tuple(range(1, xs.ndim)))

    return jax.lax.map(row, jnp.arange(m1))


class EulerSampler:
    """N Euler steps of a velocity network on times carried with its parameters
    (`gen = {'net': params, 'times': [N + 1]}`): the student interface of `distillation.evaluation`."""

    def __init__(self, denoiser, shape, num_steps: int, t_max: float, num_classes: int, conditional: bool):
        self.denoiser, self.shape, self.num_steps, self.t_max = denoiser, tuple(shape), int(num_steps), float(t_max)
        self.latent_shape, self.num_classes, self.conditional = self.shape, int(num_classes), conditional

    def kw(self, labels) -> dict:
        return {"labels": labels} if self.conditional else {}

    def draw_labels(self, key, b: int) -> jax.Array:
        return jax.random.randint(key, (b,), 0, max(self.num_classes, 1))

    def velocity(self, params, x, t, labels=None):
        return self.denoiser.velocity(params, x, t, **self.kw(labels))

    def sample(self, gen, z, labels=None):
        return flow.sample(lambda x, t: self.velocity(gen["net"], x, t, labels), self.t_max * z, gen["times"], "euler")


@register("boss", family="distill")
class BOSS(Objective):
    """Step-size search and straightening of a network teacher (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        dc = config.distill
        self.source = data_lib.build(config.data)
        if dc.teacher in ("analytic", ""):
            raise ConfigError(f"config.distill.teacher={dc.teacher!r}: BOSS straightens a network; pass the workdir of a "
                             "finished flow (or score) run, e.g. python -m experiments.prepare --config "
                             "ml_collections_configs/gmm_boss.py --workdir DIR makes one")
        self.teacher = teachers.build(config, self.source)
        if config.eval.num_samples < MIN_EVAL_SAMPLES:
            raise ConfigError(f"config.eval.num_samples must be >= {MIN_EVAL_SAMPLES}, got {config.eval.num_samples}")
        self.num_steps, self.fine_steps = int(dc.num_student_steps), int(dc.boss_fine_steps)
        if not 1 <= self.num_steps <= self.fine_steps:
            raise ConfigError(f"config.distill.num_student_steps={self.num_steps} must be between 1 and "
                             f"config.distill.boss_fine_steps={self.fine_steps}")
        if int(dc.boss_cost_samples) < 1:
            raise ConfigError(f"config.distill.boss_cost_samples must be >= 1, got {dc.boss_cost_samples}")
        if int(dc.boss_pool_size) < 1 or int(dc.boss_pool_size) % int(dc.boss_cost_samples):
            raise ConfigError(f"config.distill.boss_pool_size={dc.boss_pool_size} must be a positive multiple of "
                             f"config.distill.boss_cost_samples={dc.boss_cost_samples} (it is made in chunks of it)")
        den = self.teacher.denoiser
        self.t_max = 1.0 if isinstance(den, VelocityDenoiser) else float(flow.sigma_to_t(config.diffusion.sigma_max))
        self.fine_times = flow.uniform_times(self.fine_steps, self.t_max)
        conditional = bool(self.source.num_classes and self.teacher.net_config.model.num_classes)
        self.student = EulerSampler(den, self.source.shape, self.num_steps, self.t_max, self.source.num_classes,
                                    conditional)
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train, learning_rate=dc.lr_gen))
        self.evaluator = evaluation.Evaluator(config, self.source, self.teacher, self.student, None,
                                              f"BOSS, {self.num_steps} Euler steps")

    def frozen(self):
        return {"teacher": self.teacher.frozen()}

    def fine_trajectories(self, frozen_teacher, key, b: int):
        """Reference trajectories of the teacher from b noises, and their labels."""
        k_z, k_l = jax.random.split(key)
        z = self.t_max * jax.random.normal(k_z, (b,) + self.student.shape)
        labels = self.student.draw_labels(k_l, b)
        xs, vs = reference_trajectories(lambda x, t: self.student.velocity(frozen_teacher, x, t, labels), z,
                                        self.fine_times)
        return xs, vs, labels

    def schedule(self, frozen_teacher, key):
        """(indices into the fine grid [N + 1], times [N + 1]) of the cheapest N-step schedule."""
        xs, vs, _ = self.fine_trajectories(frozen_teacher, key, int(self.config.distill.boss_cost_samples))
        idx = plan(step_costs(xs, vs, self.fine_times), self.num_steps)
        return idx, self.fine_times[idx]

    def trajectory_pool(self, frozen_teacher, key, indices):
        """Reference trajectories at the schedule's fine indices [N + 1, P, ...] and their labels [P],
        made in chunks of `boss_cost_samples`."""
        dc = self.config.distill
        chunk = int(dc.boss_cost_samples)

        def one(k):
            xs, _, labels = self.fine_trajectories(frozen_teacher, k, chunk)
            return xs[indices], labels

        xs, labels = jax.lax.map(one, jax.random.split(key, int(dc.boss_pool_size) // chunk))  # [C, N+1, chunk, ...]
        xs = jnp.moveaxis(xs, 1, 0)
        return xs.reshape((xs.shape[0], -1) + xs.shape[3:]), labels.reshape(-1)

    def init_state(self, key, frozen):
        k_sched, k_pool, k_rng = jax.random.split(key, 3)
        idx, times = self.schedule(frozen["teacher"], jax.random.fold_in(k_sched, SCHEDULE_SALT))
        pool, pool_labels = self.trajectory_pool(frozen["teacher"], k_pool, idx)
        params = jax.tree.map(jnp.array, frozen["teacher"])
        state = ts.create_state(params, self.optimizer, k_rng)
        return state.replace(extra={"indices": idx, "times": times, "pool": pool, "pool_labels": pool_labels})

    def loss(self, params, x_sel, labels, times) -> jax.Array:
        """The straightening loss on trajectories x_sel [N + 1, B, ...] at `times` (module docstring)."""
        b = x_sel.shape[1]
        shape = (self.num_steps,) + (1,) * (x_sel.ndim - 1)
        secant = (x_sel[1:] - x_sel[:-1]) / (times[1:] - times[:-1]).reshape(shape)
        v = jax.vmap(lambda x, t: self.student.velocity(params, x, jnp.full((b,), t), labels))(x_sel[:-1], times[:-1])
        return jnp.mean((v - secant) ** 2)

    def train_step(self, state, frozen, batch):
        b = batch["x"].shape[0]  # only the batch size: the targets are the teacher's trajectories
        ex = state.extra
        rows = jax.random.randint(ts.step_key(state), (b,), 0, ex["pool"].shape[1])
        loss, grads = jax.value_and_grad(self.loss)(state.params, ex["pool"][:, rows], ex["pool_labels"][rows],
                                                    ex["times"])
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, **metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.source.batch(step, self.config.train.batch_size, process_index, process_count)

    def evaluate(self, state, frozen, key):
        times = state.extra["times"]
        uniform = flow.uniform_times(self.num_steps, self.t_max)
        out = {}
        for name, gen in (("uniform", {"net": frozen["teacher"], "times": uniform}),
                          ("schedule", {"net": frozen["teacher"], "times": times})):
            m = self.evaluator.evaluate(None, gen, frozen, key, self.cache)
            out.update({f"{name}/{k}": v for k, v in m.items() if not k.startswith("teacher/")})
        # last, so that the plot shows the refined student's samples
        refined = {"net": ts.eval_params(state), "times": times}
        out.update(self.evaluator.evaluate(None, refined, frozen, key, self.cache))
        out.update({f"boss_t{k}": float(t) for k, t in enumerate(np.asarray(times))})
        return out

    def plot(self, state, frozen, plot_dir, step):
        gen = {"net": ts.eval_params(state), "times": state.extra["times"]}
        return self.evaluator.plot(gen, plot_dir, step)
