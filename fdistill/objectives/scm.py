"""Continuous-time consistency models with TrigFlow: sCD and sCT (Lu & Song 2024, arXiv 2410.11081).

On TrigFlow's path x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I) (sec. 3; `fdistill.trigflow` holds
the conversions to EDM) the consistency function is

    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t),     f_theta(x, 0) = x exactly.

F_theta is the EDM network of `cd`/`ct` (the same MLP, input c_in x = x_t / sigma_d) with one of two time
conditionings (`distill.scm_time_conditioning`, `trigflow.network_velocity`):

* 'trigflow' (the paper's c_noise(t) = t, sec. 4.1): F_theta = -F(x_t / sigma_d; s t), s = `scm_time_scale`;
* 'edm': F_theta = -F_edm(x_t / sigma_d; ln(sigma_d tan t) / 4) (`Denoiser.raw_output`), so that
  f_theta(x_t, t) = D_theta(x_t / cos t; sigma_d tan t) is the network's own EDM denoiser and a network
  teacher's weights start f at the teacher's denoiser.

The scale s = 0.1 has MeanFlow's reason (`fdistill.objectives.meanflow`): the jvp differentiates the time
embedding, and the MLP's Fourier features (scale 16, made for ln(sigma) / 4) vary too fast in t. Measured on
the mixture (4000 updates, tangent warmup 400, with the paper's normalisation and adaptive weight; 1-step
MMD): 'edm' 0.88 (2.06 without normalisation and adaptive weight), 'trigflow' with s = 1: 1.15, s = 0.1:
0.11, s = 0.02: 0.13: as the paper's sec. 4.1 says, the time conditioning decides whether continuous-time
training works.

Training (sec. 4.2 and Algorithm 1). Levels tan(t) = e^tau / sigma_d, tau ~ N(P_mean, P_std^2)
(`distill.cm_p_mean`, `cm_p_std`; the paper's sCD uses -1.0, 1.4), i.e. the EDM level sigma = sigma_d tan t is
log-normal, clipped to [diffusion.sigma_min, diffusion.sigma_max]. The tangent of the PF-ODE is

    sCD (`distill.scm_tangent='teacher'`):  dx_t/dt = (cos t x_t - D_teacher(x_t / cos t; sigma_d tan t)) / sin t,
    sCT (`'data'`):                          dx_t/dt = cos(t) z - sin(t) x_0   (the one-sample estimate),

and one `jax.jvp` of F_theta^- (stop-gradient parameters) at (x_t, t) along (dx_t/dt, 1) gives F^- and
dF^-/dt, hence the total derivative of f_theta^- along the ODE (product rule on f = cos x - sin sigma_d F):

    df^-/dt = -cos(t) (sigma_d F^- - dx_t/dt) - sin(t) (x_t + sigma_d dF^-/dt).

Algorithm 1 uses g = cos(t) df^-/dt with the second term ramped in by the tangent warmup
r = min(1, step / `scm_tangent_warmup`), then the tangent normalisation g <- g / (||g|| + c)
(`scm_tangent_norm`, c = `scm_tangent_c`, 0.1), and the adaptive weight w_phi(t) (a small MLP on t;
`scm_adaptive_weight`; w = 0 without it):

    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),
    L(theta, phi) = E[ e^{w_phi(t)} / D || F_theta(x_t / sigma_d, t) - F^- - g ||^2 - w_phi(t) ].

(On the mixture both the normalisation and the adaptive weight made the student worse; `gmm_scm.py` turns
them off and its docstring has the numbers.)

Its gradient in theta is that of the continuous-time CM (sec. 3), E[-w(t) sigma_d sin(t) grad F_theta^T df^-/dt]
with w(t) = 1 / (sigma_d tan t) (times 2 e^w / D): the limit dt -> 0 of the discrete CM loss
||f_theta(x_t, t) - f^-(x_{t-dt}, t - dt)||^2 / (2 dt) divided by sigma = sigma_d tan t (the tests check it).
The target F^- + g moves f against its own change along the trajectory.

Sampling (multistep consistency sampling) on TrigFlow times t_0 > ... > t_{K-1}: x = f(sigma_d sin(t_0) n_0, t_0),
then x = f(cos(t_k) x + sin(t_k) sigma_d n_k, t_k) with fresh noise. t_0 = arctan(gen_sigma / sigma_d)
(1.5645 for gen_sigma = 80, cd's first level, cos t_0 = 0.006; the paper's pi/2 is sigma = infinity), and for K >= 2
t_k = `scm_mid_t` (K - k) / (K - 1), k = 1..K-1: the paper's 2-step sampler (t_1 = 1.1) for K = 2,
t = 1.1, 0.733, 0.367 after t_0 for K = 4 (our choice; the paper gives only K <= 2). This is
`students.BackwardSimulation` on the EDM levels sigma_k = sigma_d tan t_k (`trigflow.TrigFlowConsistency`).
The evaluation reports `num_student_steps` and `steps<k>/...` for k = 1, 2, 4, as cd/ct do.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill import train_state as ts
from fdistill import trigflow
from fdistill.configs import ConfigError
from fdistill.denoiser import Denoiser
from fdistill.diffusion import expand
from fdistill.distillation import students
from fdistill.objectives.base import register
from fdistill.objectives.consistency import ConsistencyObjective

TANGENTS = ("teacher", "data")
TIME_CONDITIONINGS = ("trigflow", "edm")
WEIGHT_WIDTH = 64


class TimeWeight(nn.Module):
    """The adaptive weight w_phi(t) (sec. 4.2): an MLP on c = ln(sigma_d tan t) / 4, zero at init."""

    width: int = WEIGHT_WIDTH

    @nn.compact
    def __call__(self, c_noise: jax.Array) -> jax.Array:
        h = nn.silu(nn.Dense(self.width)(c_noise[:, None]))
        h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]


def warmup(step, warmup_steps: int) -> jax.Array:
    """Tangent warmup r = min(1, step / warmup_steps) (1 throughout when warmup_steps = 0)."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def tangent(F_fn, x_t: jax.Array, t: jax.Array, dxdt: jax.Array, sigma_data: float, r=1.0):
    """(F^-, g = cos(t) df^-/dt with the warmup r on its second term) from ONE jvp of F_fn(x_t, t)
    along (dx_t/dt, 1) (module docstring; r = 1: g = cos(t) d/dt f(x_t, t) along the ODE)."""
    F, dFdt = jax.jvp(F_fn, (x_t, t), (dxdt, jnp.ones_like(t)))
    c, s = expand(jnp.cos(t), x_t), expand(jnp.sin(t), x_t)
    g = -c * c * (sigma_data * F - dxdt) - r * c * s * (x_t + sigma_data * dFdt)
    return F, g


def normalise(g: jax.Array, c: float) -> jax.Array:
    """Tangent normalisation g / (||g|| + c), the norm per example over its features."""
    norm = jnp.sqrt(jnp.sum(g**2, axis=tuple(range(1, g.ndim)), keepdims=True))
    return g / (norm + c)


def student_times(num_steps: int, t_max: float, t_mid: float) -> np.ndarray:
    """The K decreasing TrigFlow times of the K-step sampler (module docstring)."""
    rest = [t_mid * (num_steps - k) / (num_steps - 1) for k in range(1, num_steps)] if num_steps > 1 else []
    return np.array([t_max] + rest, np.float64)


@register("scm", family="distill")
class ContinuousConsistency(ConsistencyObjective):
    """sCD / sCT (module docstring). The data, teacher, student samplers and evaluation are cd's."""

    def __init__(self, config):
        dc = config.distill
        if dc.scm_tangent not in TANGENTS:
            raise ConfigError(f"config.distill.scm_tangent={dc.scm_tangent!r} is not known; allowed: {list(TANGENTS)}")
        if int(dc.scm_tangent_warmup) < 0:
            raise ConfigError(f"config.distill.scm_tangent_warmup={dc.scm_tangent_warmup} must be >= 0")
        if dc.scm_tangent_norm and not dc.scm_tangent_c > 0:
            raise ConfigError(f"config.distill.scm_tangent_c={dc.scm_tangent_c} must be > 0")
        if dc.scm_time_conditioning not in TIME_CONDITIONINGS:
            raise ConfigError(f"config.distill.scm_time_conditioning={dc.scm_time_conditioning!r} is not known; "
                             f"allowed: {list(TIME_CONDITIONINGS)}")
        self.time_scale = float(dc.scm_time_scale) if dc.scm_time_conditioning == "trigflow" else None
        if self.time_scale is not None and not self.time_scale > 0:
            raise ConfigError(f"config.distill.scm_time_scale={dc.scm_time_scale} must be > 0")
        if not dc.cm_p_std > 0:
            raise ConfigError(f"config.distill.cm_p_std={dc.cm_p_std} must be > 0")
        if not (isinstance(dc.student_sigmas, str) and dc.student_sigmas.strip() == "karras"):
            raise ConfigError(f"config.distill.student_sigmas={dc.student_sigmas!r}: scm samples on TrigFlow times "
                             "(config.distill.scm_mid_t); leave it at 'karras'")
        self.t_max = math.atan(float(dc.gen_sigma) / float(config.diffusion.sigma_data))
        if not 0.0 < dc.scm_mid_t < self.t_max:
            raise ConfigError(f"config.distill.scm_mid_t={dc.scm_mid_t} must be in (0, {self.t_max:.4f}) "
                             "(arctan(gen_sigma / sigma_data))")
        self.weight_net = TimeWeight()
        super().__init__(config)
        if self.time_scale is not None and (self.teacher.starts_students or type(self.cm.denoiser) is not Denoiser):
            raise ConfigError("config.distill.scm_time_conditioning='trigflow' conditions a fresh EDM-parametrised "
                             "network on t (config.model.parametrisation='edm', config.distill.teacher='analytic'); "
                             "a network teacher's weights need 'edm'")
        self.trajectory_fields = ()  # no discretisation curriculum
        self.trig = self.student.denoiser  # f_theta (trigflow.TrigFlowConsistency)
        self.sigma_data = self.trig.sigma_data

    def _student(self, num_steps: int):
        """BackwardSimulation of f_theta on the EDM levels sigma_d tan t_k of `student_times`."""
        dc = self.config.distill.copy_and_resolve_references()
        students.require_data_shaped_latent(dc, "consistency models: f maps a noised data-shaped point")
        sd = float(self.config.diffusion.sigma_data)
        times = student_times(num_steps, self.t_max, float(dc.scm_mid_t))
        sigmas = [float(dc.gen_sigma)] + [sd * math.tan(t) for t in times[1:]]
        dc.num_student_steps = num_steps
        dc.student_sigmas = ",".join(repr(s) for s in sigmas)
        levels = students.NoiseLevels(dc, self.config.diffusion)
        f = trigflow.TrigFlowConsistency(self.cm.denoiser, self.time_scale)  # self.cm.denoiser: the cd network
        return students.BackwardSimulation(f, levels, self.source.shape, self.source.num_classes, self.conditional,
                                           dc, self.config.diffusion)

    def init_state(self, key, frozen):
        k_gen, k_w, k_rng = jax.random.split(key, 3)
        net = (jax.tree.map(jnp.array, frozen["teacher"]) if self.teacher.starts_students
               else self.student.init(k_gen))
        weight = self.weight_net.init(k_w, jnp.zeros((1,)))["params"]
        return ts.create_state({"net": net, "weight": weight}, self.optimizer, k_rng)

    # ----- the loss -------------------------------------------------------------------------------
    def sample_t(self, key, b: int) -> jax.Array:
        """t = arctan(sigma / sigma_d), ln sigma ~ N(cm_p_mean, cm_p_std^2) clipped to [sigma_min, sigma_max]."""
        dc, d = self.config.distill, self.config.diffusion
        sigma = jnp.exp(dc.cm_p_mean + dc.cm_p_std * jax.random.normal(key, (b,)))
        return trigflow.t_from_sigma(jnp.clip(sigma, d.sigma_min, d.sigma_max), self.sigma_data)

    def log_weight(self, weight_params, t) -> jax.Array:
        """w_phi(t) (0 when `scm_adaptive_weight` is off)."""
        if not self.config.distill.scm_adaptive_weight:
            return jnp.zeros_like(t)
        c_noise = jnp.log(trigflow.sigma_from_t(t, self.sigma_data)) / 4
        return self.weight_net.apply({"params": weight_params}, c_noise)

    def velocity(self, frozen_teacher, x0, z, x_t, t, kw) -> jax.Array:
        """dx_t/dt: the teacher's PF-ODE velocity (sCD) or cos(t) z - sin(t) x_0 (sCT)."""
        if self.config.distill.scm_tangent == "data":
            return trigflow.target_velocity(x0, z, t)
        return trigflow.teacher_velocity(lambda x, s: self.teacher(frozen_teacher, x, s, **kw), x_t, t,
                                         self.sigma_data)

    def loss(self, params, frozen, x0, z, t, r, labels=None):
        """(L(theta, phi), metrics) of the module docstring; z ~ N(0, sigma_d^2 I)."""
        dc = self.config.distill
        kw = self.student.kw(labels)
        x_t = trigflow.interpolate(x0, z, t)
        dxdt = jax.lax.stop_gradient(self.velocity(frozen["teacher"], x0, z, x_t, t, kw))
        frozen_net = jax.lax.stop_gradient(params["net"])
        F_minus, g = tangent(lambda x, s: self.trig.F(frozen_net, x, s, **kw), x_t, t, dxdt, self.sigma_data, r)
        g_norm = jnp.sqrt(jnp.sum(g**2, axis=tuple(range(1, g.ndim))))
        target = jax.lax.stop_gradient(F_minus + (normalise(g, dc.scm_tangent_c) if dc.scm_tangent_norm else g))
        F = self.trig.F(params["net"], x_t, t, **kw)
        sq = jnp.mean((F - target) ** 2, axis=tuple(range(1, x0.ndim)))  # ||.||^2 / D
        w = self.log_weight(params["weight"], t)
        loss = jnp.mean(jnp.exp(w) * sq - w)
        return loss, {"scm_sq": jnp.mean(sq), "tangent_norm": jnp.mean(g_norm), "weight_mean": jnp.mean(w)}

    def train_step(self, state, frozen, batch):
        x0 = batch["x"]
        k_t, k_z = jax.random.split(ts.step_key(state))
        t = self.sample_t(k_t, x0.shape[0])
        z = self.sigma_data * jax.random.normal(k_z, x0.shape, x0.dtype)
        r = warmup(state.step, int(self.config.distill.scm_tangent_warmup))
        labels = batch.get("label") if self.conditional else None
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, frozen, x0, z, t, r, labels)
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, "tangent_warmup": r, **aux, **metrics}

    # ----- evaluation (cd's, on the network's parameters) -----------------------------------------
    def evaluate(self, state, frozen, key):
        net_state = state.replace(params=state.params["net"],
                                  ema_params=None if state.ema_params is None else state.ema_params["net"])
        return super().evaluate(net_state, frozen, key)

    def plot(self, state, frozen, plot_dir, step):
        return self.evaluators[self.num_steps].plot(ts.eval_params(state)["net"], plot_dir, step)
