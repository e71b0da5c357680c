"""Flow matching on the linear interpolant, and its exact link to the EDM (VE) convention.

Rectified flow / conditional flow matching (arXiv 2209.03003, 2210.02747) noises data x_0 as

    x_t = (1 - t) x_0 + t eps,   t in [0, 1],   eps ~ N(0, I),

and learns the velocity v(x_t, t) = E[eps - x_0 | x_t]; samples follow dx/dt = v from t = 1
(pure noise) to t = 0. Dividing by (1 - t) gives EDM's x_sigma = x_0 + sigma eps with

    sigma = t / (1 - t),   t = sigma / (1 + sigma),   x_t = x_sigma / (1 + sigma),

so the posterior means agree at matching levels and a velocity converts exactly to a denoiser and
back (eps_hat - x0_hat = v and x_t = (1 - t) x0_hat + t eps_hat):

    D(x_sigma; sigma) = x0_hat = x_t - t v(x_t, t),      v(x_t, t) = (x_t - x0_hat) / t.

The score follows from D as always: grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2. This is what
lets every distillation objective take a flow-matching teacher unchanged (`denoiser.VelocityDenoiser`).
An Euler step in t equals an Euler step in sigma of the EDM ODE (both are DDIM); Heun steps differ.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fdistill.configs import ConfigError
from fdistill.diffusion import SAMPLERS, expand

Velocity = Callable[[jax.Array, jax.Array], jax.Array]  # v(x_t, t [B]) -> velocity
T_DISTRIBUTIONS = ("logit_normal", "uniform")


def sigma_to_t(sigma):
    """t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)


def t_to_sigma(t):
    """sigma = t / (1 - t) (t < 1)."""
    return t / (1.0 - t)


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x_0 + t eps (t per example)."""
    t = expand(t, x0)
    return (1.0 - t) * x0 + t * eps


def target_velocity(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """d x_t / dt = eps - x_0, the regression target of flow matching."""
    return eps - x0


def denoiser_from_velocity(v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """x0_hat = x_t - t v."""
    return x_t - expand(t, x_t) * v


def velocity_from_denoiser(x0_hat: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """v = (x_t - x0_hat) / t (t > 0)."""
    return (x_t - x0_hat) / expand(t, x_t)


def check_t_distribution(distribution: str) -> None:
    """A ValueError naming config.flow.t_distribution unless it is one of T_DISTRIBUTIONS."""
    if distribution not in T_DISTRIBUTIONS:
        raise ConfigError(f"config.flow.t_distribution={distribution!r} is not known; allowed: {list(T_DISTRIBUTIONS)}")


def sample_t(key, shape, distribution: str = "logit_normal", mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Training levels: logit-normal (t = sigmoid(mean + std n), SD3's default, arXiv 2403.03206)
    or uniform on (0, 1)."""
    check_t_distribution(distribution)
    if distribution == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))
    return jax.random.uniform(key, shape, minval=1e-5, maxval=1.0 - 1e-5)


def uniform_times(num_steps: int, t_max: float = 1.0) -> jax.Array:
    """N + 1 decreasing times t_max = t_0 > ... > t_N = 0, equally spaced."""
    return jnp.linspace(t_max, 0.0, num_steps + 1, dtype=jnp.float32)


def sample(velocity: Velocity, noise: jax.Array, times: jax.Array, sampler: str = "euler") -> jax.Array:
    """Integrates dx/dt = v(x, t) from x = noise at times[0] (1 for a velocity network) to times[-1] = 0
    along `times` (decreasing, N + 1 values, a traced array: one compile per N for every schedule).
    Heun corrects every step but the one ending at t = 0, as EDM's Algorithm 1: NFE 2N - 1; Euler N."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; allowed: {list(SAMPLERS)}")
    times = jnp.asarray(times, jnp.float32)
    body = lambda i, x: ode_step(velocity, x, times[i], times[i + 1], sampler)[0]  # noqa: E731
    return jax.lax.fori_loop(0, times.shape[0] - 1, body, noise)


def ode_step(velocity: Velocity, x: jax.Array, t, t_next, sampler: str = "euler"):
    """(x at t_next, v(x, t)): one Euler step, or Heun's unless t_next = 0 (scalar times)."""
    b = x.shape[0]
    v = velocity(x, jnp.full((b,), t))
    x_euler = x + (t_next - t) * v
    if sampler == "euler":
        return x_euler, v

    def heun(_):
        v2 = velocity(x_euler, jnp.full((b,), t_next))
        return x + (t_next - t) * 0.5 * (v + v2)

    return jax.lax.cond(t_next > 0, heun, lambda _: x_euler, None), v
