"""Consistency models: distillation from a teacher ('cd') and training without one ('ct').

Song et al. 2023 (arXiv 2303.01469) with the improved recipe of Song & Dhariwal 2023 (iCT, arXiv
2310.14189). A consistency function maps any point of an ODE trajectory to its start,
f(x_sigma, sigma) ~ x_0, with the boundary condition f(x, sigma_min) = x built into the
parametrisation (arXiv 2303.01469 appendix C) around the network F_theta of any denoiser:

    f_theta(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in x; c_noise),
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
    c_out = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2)       (c_skip = 1, c_out = 0 at sigma_min),

with EDM's c_in, c_noise: F is the EDM network's output (`Denoiser.raw_output`; for a velocity
network the F that its D implies), so f -> D as sigma grows and a teacher's weights start f at D.
(Wrapping D itself, f = c_skip x + (1 - c_skip) D, shrinks F's effective scale by 1 - c_skip at
small sigma, 0.1 at sigma = 0.17: measured on the mixture, f then stayed 0.1 from the ODE end
points there.)

On the Karras grid sigma_min = s_0 < ... < s_{N-1} = sigma_max (arXiv 2206.00364 eq. 5) a training
pair takes an interval i, x_hi = x_0 + s_{i+1} z from data x_0 and

    cd:  x_lo = one Heun step of the teacher's probability-flow ODE from (x_hi, s_{i+1}) to s_i,
    ct:  x_lo = x_0 + s_i z (the same z: the unbiased one-sample estimate of that step),

    L = E[ lambda_i d(f_theta(x_hi, s_{i+1}), sg(f_theta(x_lo, s_i))) ],  lambda_i = 1 / (s_{i+1} - s_i),

with d the pseudo-Huber distance sqrt(|.|^2 + c^2) - c (c = 0.00054 sqrt(dim)) or the squared L2
mean (`distill.cm_loss`). iCT's choices: the target network is the stop-gradient of the online one
(no EMA target), the interval i is drawn with the probability that ln sigma ~ N(P_mean, P_std^2)
falls in it (`cm_sigma_sampling='lognormal'`; 'uniform' is the original CM), and N doubles
during training, N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)), from
s0 = `cm_scales_min` to s1 = `cm_scales_max` over K = `train.num_steps` updates (s0 = s1: a fixed
grid, as CD uses). A network teacher initialises the student with its weights; 'ct' from a
pretrained diffusion model is then consistency tuning (ECT, arXiv 2406.14548).

ECT's continuous-time schedule (`cm_schedule='ect'`, ct only; read from `locuslab/ect`'s
`training/loss.py` for facts): no grid. sigma_hi = t with ln t ~ N(P_mean, P_std^2) (clipped to
[sigma_min, sigma_max]) and sigma_lo = r from ECT's mapping function

    r = t (1 - q^-(a+1) n(t)),   n(t) = 1 + k sigmoid(-b t),   clamped at 0,

in stage a = floor(update * A / K) of A = `cm_ect_stages` equal stages of the K = `train.num_steps`
updates: dt / t = q^-(a+1) n(t) shrinks by q per stage (dt -> 0), and where r <= sigma_min the target is
x_0 itself (at first, small t: denoising). The weight is ECT's 1 / t^2 + 1 / sigma_data^2 instead of
1 / (s_{i+1} - s_i); the distance stays `cm_loss` (ECT: sqrt(|d|^2 + c^2) - c with c = 0).

Sampling (multistep consistency sampling, Algorithm 1 of arXiv 2303.01469) on the student noise
levels of `distill.num_student_steps` / `student_sigmas`: x = f(sigma_0 z, sigma_0), then
x = f(x + sigma_k n_k, sigma_k) with fresh noise (`students.BackwardSimulation`'s sampler; the paper
re-noises with sqrt(sigma_k^2 - sigma_min^2), a 2e-3 relative difference at sigma_min = 0.002). The
evaluation also reports the 1-, 2- and 4-step samplers of the same network (`steps<k>/...`): one
consistency model serves every step count.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import data as data_lib
from fdistill import diffusion
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.distillation import evaluation, students, teachers
from fdistill.evaluation.samples import MIN_EVAL_SAMPLES, by_step_count
from fdistill.objectives.base import Objective, register

LOSSES = ("pseudo_huber", "l2")
SIGMA_SAMPLINGS = ("lognormal", "uniform")
SCHEDULES = ("ict", "ect")
EVAL_STEPS = (1, 2, 4)


class ConsistencyFunction:
    """f(x, sigma) = c_skip x + c_out F (module docstring): exactly the identity at sigma_min.
    Presents the denoiser interface the student samplers use."""

    def __init__(self, denoiser, sigma_min: float):
        self.denoiser, self.sigma_min = denoiser, float(sigma_min)
        self.sigma_data = denoiser.sigma_data

    def coefficients(self, sigma):
        """(c_skip, c_out) of the consistency parametrisation."""
        sd, s = self.sigma_data, sigma - self.sigma_min
        return sd**2 / (s**2 + sd**2), sd * s / jnp.sqrt(sd**2 + sigma**2)

    def init(self, key, x_example, **kw):
        return self.denoiser.init(key, x_example, **kw)

    def __call__(self, params, x, sigma, **kw):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        c_skip, c_out = (diffusion.expand(c, x) for c in self.coefficients(sigma))
        return c_skip * x + c_out * self.denoiser.raw_output(params, x, sigma, **kw)


def karras_grid(n: jax.Array, n_max: int, sigma_min: float, sigma_max: float, rho: float) -> jax.Array:
    """The ascending grid s_0 = sigma_min, ..., s_{n-1} = sigma_max of n (traced) points, padded to
    n_max entries (entries from index n on repeat sigma_max)."""
    i = jnp.minimum(jnp.arange(n_max, dtype=jnp.float32), n - 1)
    frac = i / (n - 1).astype(jnp.float32)
    return (sigma_min ** (1 / rho) + frac * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def num_scales(step, total_steps: int, s0: int, s1: int) -> jax.Array:
    """iCT's discretisation curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1 (module docstring)."""
    if s0 == s1:
        return jnp.asarray(s0 + 1, jnp.int32)
    k_prime = max(total_steps // (int(math.log2(s1 / s0)) + 1), 1)
    doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // k_prime, 30)
    return jnp.minimum(s0 * 2**doublings, s1).astype(jnp.int32) + 1


def interval_logits(grid: jax.Array, n: jax.Array, sampling: str, p_mean: float, p_std: float) -> jax.Array:
    """Log-probabilities of the intervals [s_i, s_{i+1}], i < n - 1 (padding: -inf): uniform, or
    iCT's erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) / (sqrt 2 P_std))."""
    valid = jnp.arange(grid.shape[0] - 1) < n - 1
    if sampling == "uniform":
        w = jnp.ones(grid.shape[0] - 1)
    else:
        c = jax.scipy.special.erf((jnp.log(grid) - p_mean) / (math.sqrt(2.0) * p_std))
        w = jnp.maximum(c[1:] - c[:-1], 1e-30)
    return jnp.where(valid, jnp.log(w), -jnp.inf)


def ect_stage(step, total_steps: int, stages: int) -> jax.Array:
    """ECT's stage a = min(floor(step * stages / total_steps), stages - 1) (module docstring)."""
    return jnp.minimum(jnp.asarray(step, jnp.int32) * stages // max(total_steps, 1), stages - 1)


def ect_r(t: jax.Array, stage, q: float, k: float, b: float) -> jax.Array:
    """ECT's mapping r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clamped at 0."""
    decay = jnp.asarray(q, jnp.float32) ** -(jnp.asarray(stage, jnp.float32) + 1.0)
    return jnp.maximum(t * (1.0 - decay * (1.0 + k * jax.nn.sigmoid(-b * t))), 0.0)


def distance(a, b, kind: str, huber_c: float) -> jax.Array:
    """Per-example pseudo-Huber sqrt(|a - b|^2 + c^2) - c (c = huber_c sqrt(dim), sums over features)
    or the squared L2 mean over features."""
    axes = tuple(range(1, a.ndim))
    sq = jnp.sum((a - b) ** 2, axis=axes)
    if kind == "l2":
        return sq / np.prod(a.shape[1:])
    c = huber_c * math.sqrt(np.prod(a.shape[1:]))
    return jnp.sqrt(sq + c**2) - c


class ConsistencyObjective(Objective):
    """A consistency model of a teacher ('cd') or of the data alone ('ct')."""

    distill_from_teacher = True

    def __init__(self, config):
        super().__init__(config)
        dc, d = config.distill, config.diffusion
        self.source = data_lib.build(config.data)
        self.teacher = teachers.build(config, self.source)
        for field, value, allowed in (("cm_loss", dc.cm_loss, LOSSES),
                                      ("cm_sigma_sampling", dc.cm_sigma_sampling, SIGMA_SAMPLINGS),
                                      ("cm_schedule", dc.cm_schedule, SCHEDULES)):
            if value not in allowed:
                raise ConfigError(f"config.distill.{field}={value!r} is not known; allowed: {list(allowed)}")
        self.ect = dc.cm_schedule == "ect"
        if self.ect and (self.name != "ct" or not dc.cm_ect_q > 1 or int(dc.cm_ect_stages) < 1 or dc.cm_ect_k < 0):
            raise ConfigError(f"config.distill.cm_schedule='ect' is consistency training's (objective 'ct', got "
                             f"{self.name!r}) and needs config.distill.cm_ect_q > 1 (got {dc.cm_ect_q}), "
                             f"cm_ect_stages >= 1 (got {dc.cm_ect_stages}) and cm_ect_k >= 0 (got {dc.cm_ect_k})")
        self.s0, self.s1 = int(dc.cm_scales_min), int(dc.cm_scales_max)
        if not 1 <= self.s0 <= self.s1:
            raise ConfigError(f"config.distill.cm_scales_min/max=({self.s0}, {self.s1}) must satisfy 1 <= min <= max")
        if config.eval.num_samples < MIN_EVAL_SAMPLES:
            raise ConfigError(f"config.eval.num_samples must be >= {MIN_EVAL_SAMPLES}, got {config.eval.num_samples}")
        self.conditional = bool(self.source.num_classes and self.teacher.net_config.model.num_classes)
        self.cm = ConsistencyFunction(students.generator_denoiser(self.teacher, config, self.source.shape),
                                      d.sigma_min)
        self.num_steps = int(dc.num_student_steps)
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train, learning_rate=dc.lr_gen))
        # the curriculum's (or ECT's stages') length
        self.trajectory_fields = ("train.num_steps",) if (self.s0 != self.s1 or self.ect) else ()
        self.evaluators = {k: evaluation.Evaluator(config, self.source, self.teacher, self._student(k), None,
                                                   f"{k}-step {self.name}") for k in {*EVAL_STEPS, self.num_steps}}
        self.student = self.evaluators[self.num_steps].student

    def _student(self, num_steps: int):
        dc = self.config.distill.copy_and_resolve_references()
        dc.num_student_steps = num_steps
        students.require_data_shaped_latent(dc, "consistency models: f maps a noised data-shaped point")
        levels = students.NoiseLevels(dc, self.config.diffusion)
        return students.BackwardSimulation(self.cm, levels, self.source.shape, self.source.num_classes,
                                           self.conditional, dc, self.config.diffusion)

    def frozen(self):
        return {"teacher": self.teacher.frozen()}

    def init_state(self, key, frozen):
        k_gen, k_rng = jax.random.split(key)
        params = (jax.tree.map(jnp.array, frozen["teacher"]) if self.teacher.starts_students
                  else self.student.init(k_gen))
        return ts.create_state(params, self.optimizer, k_rng)

    # ----- the loss -------------------------------------------------------------------------------
    def pair_levels(self, step, key, b: int):
        """(s_i, s_{i+1}) per example for update `step` (curriculum and interval sampling), or ECT's
        (r, t) (`cm_schedule='ect'`)."""
        dc, d = self.config.distill, self.config.diffusion
        if self.ect:
            t = jnp.clip(jnp.exp(dc.cm_p_mean + dc.cm_p_std * jax.random.normal(key, (b,))), d.sigma_min, d.sigma_max)
            stage = ect_stage(step, int(self.config.train.num_steps), int(dc.cm_ect_stages))
            return ect_r(t, stage, dc.cm_ect_q, dc.cm_ect_k, dc.cm_ect_b), t
        n = num_scales(step, int(self.config.train.num_steps), self.s0, self.s1)
        grid = karras_grid(n, self.s1 + 1, d.sigma_min, d.sigma_max, d.rho)
        logits = interval_logits(grid, n, dc.cm_sigma_sampling, dc.cm_p_mean, dc.cm_p_std)
        i = jax.random.categorical(key, logits, shape=(b,))
        return grid[i], grid[i + 1]

    def lower_point(self, frozen_teacher, x0, z, x_hi, s_lo, s_hi, kw):
        """x at s_i: a Heun step of the teacher ('cd') or x_0 + s_i z ('ct')."""
        if not self.distill_from_teacher:
            return x0 + diffusion.expand(s_lo, x0) * z
        return diffusion.heun_step(lambda x, s: self.teacher(frozen_teacher, x, s, **kw), x_hi, s_hi, s_lo)

    def loss(self, params, frozen, x0, z, s_lo, s_hi, labels=None) -> jax.Array:
        dc = self.config.distill
        kw = self.student.kw(labels)
        x_hi = x0 + diffusion.expand(s_hi, x0) * z
        s_eval = jnp.maximum(s_lo, self.cm.sigma_min) if self.ect else s_lo  # ECT's r goes below sigma_min
        x_lo = jax.lax.stop_gradient(self.lower_point(frozen["teacher"], x0, z, x_hi, s_eval, s_hi, kw))
        target = jax.lax.stop_gradient(self.cm(params, x_lo, s_eval, **kw))
        if self.ect:  # where r <= sigma_min the target is x_0 itself
            at_data = (s_lo <= self.cm.sigma_min).reshape(s_lo.shape + (1,) * (x0.ndim - 1))
            target = jnp.where(at_data, x0, target)
        d = distance(self.cm(params, x_hi, s_hi, **kw), target, dc.cm_loss, dc.cm_huber_c)
        if self.ect:
            return jnp.mean(d * (1.0 / s_hi**2 + 1.0 / self.cm.sigma_data**2))
        return jnp.mean(d / (s_hi - s_lo))

    def train_step(self, state, frozen, batch):
        x0 = batch["x"]
        k_i, k_z = jax.random.split(ts.step_key(state))
        s_lo, s_hi = self.pair_levels(state.step, k_i, x0.shape[0])
        z = jax.random.normal(k_z, x0.shape, x0.dtype)
        labels = batch.get("label") if self.conditional else None
        loss, grads = jax.value_and_grad(self.loss)(state.params, frozen, x0, z, s_lo, s_hi, labels)
        if self.ect:
            schedule = {"ect_stage": ect_stage(state.step, int(self.config.train.num_steps),
                                               int(self.config.distill.cm_ect_stages))}
        else:
            schedule = {"num_scales": num_scales(state.step, int(self.config.train.num_steps), self.s0, self.s1)}
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, **schedule, **metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.source.batch(step, self.config.train.batch_size, process_index, process_count)

    # ----- evaluation -----------------------------------------------------------------------------
    def evaluate(self, state, frozen, key):
        """The configured sampler's metrics, and `steps<k>/...` of the other step counts."""
        gen = ts.eval_params(state)

        def metrics_at(k):
            m = self.evaluators[k].evaluate(state.params, gen, frozen, key, self.cache)
            return m if k == self.num_steps else {n: v for n, v in m.items() if not n.startswith("teacher/")}

        return by_step_count(self.num_steps, metrics_at, EVAL_STEPS)

    def plot(self, state, frozen, plot_dir, step):
        return self.evaluators[self.num_steps].plot(ts.eval_params(state), plot_dir, step)


@register("cd", family="distill")
class ConsistencyDistillation(ConsistencyObjective):
    distill_from_teacher = True


@register("ct", family="distill")
class ConsistencyTraining(ConsistencyObjective):
    distill_from_teacher = False
