"""MeanFlow: one- and few-step generation by average velocities (Geng et al. 2025, arXiv 2505.13447).

On the flow-matching path z_t = (1 - t) x + t eps (`fdistill.flow`, instantaneous velocity
v = eps - x), the average velocity between times r <= t along the ODE trajectory through z_t is

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,     so that   z_r = z_t - (t - r) u(z_t, r, t).

Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity (eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . grad_z u + d_t u,

whose total derivative is one forward-mode product: `jax.jvp` of u_theta at (z, r, t) with the
tangent (v, 0, 1). The network regresses the stop-gradient target (eq. 9-10)

    u_tgt = v_t - (t - r) sg(jvp(u_theta, (z_t, r, t), (v_t, 0, 1))),   v_t = eps - x,
    L = sg(w) || u_theta(z_t, r, t) - sg(u_tgt) ||^2,   w = 1 / (||.||^2 + c)^p      (adaptive, p = 1),

with (t, r) two logit-normal draws sorted so that t >= r, and r = t for a fraction
1 - `flow.meanflow_ratio` of the pairs (there u = v: plain flow matching). The network is
`config.model` conditioned on s (t, t - r) (two Fourier embeddings summed). The scale s
(`flow.meanflow_time_scale`, 0.1) matters: the jvp differentiates the embedding, and EDM's Fourier
frequencies (scale 16, made for ln(sigma) / 4) on t in [0, 1] give d/dt of order 100, targets with
|delta|^2 ~ 500 and a velocity that is never learned (measured on the mixture: at r = t the error
of u stayed at the size of v itself; with s = 0.1 it is 0.03 of it). Sampling with N uniform
steps: z_{t_{k+1}} = z_{t_k} - (t_k - t_{k+1}) u(z_{t_k}, t_{k+1}, t_k); one step is x = eps - u(eps, 0, 1).
The evaluation reports `config.eval.num_steps` (default 1) and `steps<k>/...` for k = 1, 2, 4.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import data as data_lib
from fdistill import diffusion, flow, models
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.denoiser import label_kwargs, sample_in_chunks
from fdistill.evaluation.samples import by_step_count
from fdistill.evaluation.timing import timed_sampling
from fdistill.objectives.base import Objective, register
from fdistill.objectives.score import plot_samples

EVAL_STEPS = (1, 2, 4)


def meanflow_target(u_fn, z, r, t, v):
    """(u(z, r, t), u_tgt = v - (t - r) d/dt u) with d/dt u = jvp(u, (z, r, t), (v, 0, 1)) (eq. 6)."""
    u, dudt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    return u, v - diffusion.expand(t - r, z) * dudt


def sample_times(key, b: int, flow_config):
    """(r, t) per example: two draws of the t distribution sorted so that r <= t; r = t with
    probability 1 - meanflow_ratio."""
    f = flow_config
    k1, k2, k3 = jax.random.split(key, 3)
    a = flow.sample_t(k1, (b,), f.t_distribution, f.t_mean, f.t_std)
    c = flow.sample_t(k2, (b,), f.t_distribution, f.t_mean, f.t_std)
    t, r = jnp.maximum(a, c), jnp.minimum(a, c)
    return jnp.where(jax.random.uniform(k3, (b,)) < f.meanflow_ratio, r, t), t


@register("meanflow", family="flow")
class MeanFlow(Objective):
    """Average-velocity network trained with the MeanFlow identity (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.source = data_lib.build(config.data)
        if config.model.parametrisation != "velocity":
            raise ConfigError(f"config.model.parametrisation={config.model.parametrisation!r}: MeanFlow's network "
                             "outputs a velocity; set it to 'velocity'")
        f = config.flow
        if not 0.0 <= f.meanflow_ratio <= 1.0:
            raise ConfigError(f"config.flow.meanflow_ratio={f.meanflow_ratio} must be in [0, 1]")
        if f.meanflow_p < 0 or f.meanflow_c <= 0:
            raise ConfigError(f"config.flow.meanflow_p={f.meanflow_p} must be >= 0 and config.flow.meanflow_c="
                             f"{f.meanflow_c} > 0")
        flow.check_t_distribution(f.t_distribution)
        if int(config.eval.num_steps) < 1:
            raise ConfigError(f"config.eval.num_steps={config.eval.num_steps} must be >= 1")
        self.net = models.build(config.model, self.source.shape, config.train.compute_dtype)
        self.num_classes = config.model.num_classes if self.source.num_classes else 0
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train))
        self._samplers = {}

    def u(self, params, z, r, t, labels=None):
        """u_theta(z, r, t), the network conditioned on s (t, t - r), s = `flow.meanflow_time_scale`."""
        kw = label_kwargs(self.num_classes, labels)
        c = self.config.flow.meanflow_time_scale * jnp.stack([t, t - r], axis=-1).astype(jnp.float32)
        return self.net.apply({"params": params}, z, c, **kw).astype(z.dtype)

    def init_state(self, key, frozen):
        k_init, k_rng = jax.random.split(key)
        x = jnp.zeros((1,) + tuple(self.source.shape), jnp.float32)
        params = self.net.init(k_init, x, jnp.zeros((1, 2)),
                               **label_kwargs(self.num_classes, jnp.zeros((1,), jnp.int32)))["params"]
        return ts.create_state(params, self.optimizer, k_rng)

    def loss(self, params, x0, eps, r, t, labels=None):
        """(adaptively weighted loss, mean ||delta||^2) of eq. 9-10."""
        f = self.config.flow
        z = flow.interpolate(x0, eps, t)
        u, target = meanflow_target(lambda z, r, t: self.u(params, z, r, t, labels), z, r, t,
                                    flow.target_velocity(x0, eps))
        sq = jnp.sum((u - jax.lax.stop_gradient(target)) ** 2, axis=tuple(range(1, x0.ndim)))
        w = jax.lax.stop_gradient(1.0 / (sq + f.meanflow_c) ** f.meanflow_p)
        return jnp.mean(w * sq), jnp.mean(sq)

    def train_step(self, state, frozen, batch):
        x0 = batch["x"]
        k_t, k_e = jax.random.split(ts.step_key(state))
        r, t = sample_times(k_t, x0.shape[0], self.config.flow)
        eps = jax.random.normal(k_e, x0.shape, x0.dtype)
        labels = batch.get("label") if self.num_classes else None
        (loss, sq), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, x0, eps, r, t, labels)
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, "delta_sq": sq, **metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.source.batch(step, self.config.train.batch_size, process_index, process_count)

    # ----- sampling and evaluation ----------------------------------------------------------------
    def sample_fn(self, num_steps: int):
        """The jitted N-step sampler (params, noise, labels) -> samples (module docstring)."""
        if num_steps not in self._samplers:
            times = flow.uniform_times(num_steps)

            def fn(params, z, labels):
                b = z.shape[0]
                for k in range(num_steps):
                    t, r = jnp.full((b,), times[k]), jnp.full((b,), times[k + 1])
                    z = z - (times[k] - times[k + 1]) * self.u(params, z, r, t, labels)
                return z

            self._samplers[num_steps] = jax.jit(fn)
        return self._samplers[num_steps]

    def sample(self, params, key, n: int, num_steps: int, labels=None) -> np.ndarray:
        return sample_in_chunks(self.sample_fn(num_steps), params, key, n, self.config.eval.chunk, self.source.shape,
                                self.num_classes, labels)[0]

    def evaluate(self, state, frozen, key):
        e = self.config.eval
        params = ts.eval_params(state)

        def metrics_at(k):
            x, per_sec = timed_sampling(lambda n: self.sample(params, key, n, k), e.num_samples)
            if k == int(e.num_steps):
                self._last_samples = x
            return {**self.source.evaluate_samples(x), "nfe": float(k), "samples_per_sec": per_sec}

        return by_step_count(int(e.num_steps), metrics_at, EVAL_STEPS)

    def plot(self, state, frozen, plot_dir, step):
        e = self.config.eval
        draw = lambda: self.sample(ts.eval_params(state), jax.random.key(0), e.num_samples, int(e.num_steps))
        return plot_samples(self, draw, plot_dir, step, f"MeanFlow, {e.num_steps} step(s), step {step}")
