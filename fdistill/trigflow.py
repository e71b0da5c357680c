"""TrigFlow (Lu & Song 2024, arXiv 2410.11081 sec. 3) and its exact link to the EDM convention.

TrigFlow noises data x_0 as

    x_t = cos(t) x_0 + sin(t) z,   t in [0, pi/2],   z ~ N(0, sigma_d^2 I),

and its probability-flow ODE is dx_t/dt = E[cos(t) z - sin(t) x_0 | x_t], written sigma_d F(x_t / sigma_d, t)
with a network F. Dividing by cos(t) gives EDM's x_sigma = x_0 + sigma eps (eps ~ N(0, I)) with

    sigma = sigma_d tan(t),   t = arctan(sigma / sigma_d),   x_sigma = x_t / cos(t),   x_t = cos(t) x_sigma,

so the posterior means agree at matching levels: E[x_0 | x_t] = D(x_t / cos t; sigma_d tan t) for EDM's
denoiser D. With x0_hat = E[x_0 | x_t] and E[z | x_t] = (x_t - cos t x0_hat) / sin t, the velocity is

    v(x_t, t) = (cos(t) x_t - x0_hat) / sin(t),        x0_hat = cos(t) x_t - sin(t) v(x_t, t),

exact for t in (0, pi/2): an EDM or flow teacher's denoiser gives the TrigFlow teacher velocity.
The consistency function of sCM (sec. 3, "consistency models in TrigFlow") has the same form,

    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t),        f(x, 0) = x,

and EDM's preconditioning at sigma = sigma_d tan t is TrigFlow's: c_skip = cos^2 t, c_out = sigma_d sin t,
c_in x_sigma = x_t / sigma_d, so D = cos(t) x_t + sigma_d sin(t) F_edm and an EDM network is a TrigFlow
network with F = -F_edm and time conditioning c_noise = ln(sigma_d tan t) / 4 (`network_velocity`; or
conditioned on t itself, the paper's choice).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fdistill.diffusion import expand

# The network is evaluated at t in [T_EPS, pi/2 - T_EPS] (sigma from 2.5e-5 to 2500 sigma_d): at t = 0
# sigma = 0 has c_noise = -inf, and the clip keeps F finite so that f(x, 0) = x holds exactly.
T_EPS = 5e-5


def sigma_from_t(t, sigma_data: float):
    """sigma = sigma_d tan(t)."""
    return sigma_data * jnp.tan(t)


def t_from_sigma(sigma, sigma_data: float):
    """t = arctan(sigma / sigma_d)."""
    return jnp.arctan(jnp.asarray(sigma) / sigma_data)


def to_edm(x_t: jax.Array, t: jax.Array, sigma_data: float):
    """(x_sigma = x_t / cos t, sigma = sigma_d tan t) of a TrigFlow point (t per example, t < pi/2)."""
    return x_t / expand(jnp.cos(t), x_t), sigma_from_t(t, sigma_data)


def from_edm(x: jax.Array, sigma: jax.Array, sigma_data: float):
    """(x_t = cos(t) x_sigma, t) of an EDM point: cos t = sigma_d / sqrt(sigma^2 + sigma_d^2)."""
    t = t_from_sigma(sigma, sigma_data)
    return x * expand(jnp.cos(t), x), t


def interpolate(x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = cos(t) x_0 + sin(t) z (z ~ N(0, sigma_d^2 I), t per example)."""
    return expand(jnp.cos(t), x0) * x0 + expand(jnp.sin(t), x0) * z


def target_velocity(x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """d x_t / dt = cos(t) z - sin(t) x_0: the conditional velocity (sCT's tangent)."""
    return expand(jnp.cos(t), x0) * z - expand(jnp.sin(t), x0) * x0


def velocity_from_denoiser(x0_hat: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """v = (cos(t) x_t - x0_hat) / sin(t) (0 < t < pi/2)."""
    return (expand(jnp.cos(t), x_t) * x_t - x0_hat) / expand(jnp.sin(t), x_t)


def denoiser_from_velocity(v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """x0_hat = cos(t) x_t - sin(t) v."""
    return expand(jnp.cos(t), x_t) * x_t - expand(jnp.sin(t), x_t) * v


def teacher_velocity(denoise, x_t: jax.Array, t: jax.Array, sigma_data: float) -> jax.Array:
    """The PF-ODE velocity of an EDM denoiser `denoise(x, sigma)`:
    (cos t x_t - D(x_t / cos t; sigma_d tan t)) / sin t."""
    x, sigma = to_edm(x_t, t, sigma_data)
    return velocity_from_denoiser(denoise(x, sigma), x_t, t)


def consistency(x_t: jax.Array, t: jax.Array, F: jax.Array, sigma_data: float) -> jax.Array:
    """f = cos(t) x_t - sin(t) sigma_d F: exactly x_t at t = 0 for every finite F."""
    return expand(jnp.cos(t), x_t) * x_t - expand(jnp.sin(t), x_t) * sigma_data * F


def network_velocity(denoiser, params, x_t: jax.Array, t: jax.Array, time_scale: float | None = None, **kw
                     ) -> jax.Array:
    """TrigFlow's F_theta(x_t / sigma_d, t) of an EDM denoiser network (`fdistill.denoiser`), t clipped to
    [T_EPS, pi/2 - T_EPS] for the network only (module docstring):

    * `time_scale=None`: -F_edm, the network's raw output at (x_t / cos t; sigma_d tan t), conditioned on
      EDM's c_noise = ln(sigma_d tan t) / 4 (for a velocity network, the F its D implies);
    * `time_scale=s`: -F(x_t / sigma_d; s t), the network conditioned on the paper's c_noise(t) = t
      (arXiv 2410.11081 sec. 4.1), scaled by s (EDM-parametrised networks only).
    """
    t = jnp.clip(jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1]), T_EPS, math.pi / 2 - T_EPS)
    if time_scale is not None:
        return -denoiser.apply_net(params, x_t / denoiser.sigma_data, time_scale * t, **kw).astype(x_t.dtype)
    x, sigma = to_edm(x_t, t, denoiser.sigma_data)
    return -denoiser.raw_output(params, x, sigma, **kw)


class TrigFlowConsistency:
    """f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta (module docstring) around an EDM denoiser
    network (its time conditioning: `network_velocity`), presented in EDM coordinates for the student
    samplers: `self(params, x, sigma)` = f_theta(cos(t) x, t) with t = arctan(sigma / sigma_d). (TrigFlow
    re-noising x_t = cos t x0 + sin t z is EDM's x0 + sigma eps scaled by cos t, so
    `students.BackwardSimulation` on the levels sigma_k = sigma_d tan t_k is the TrigFlow multistep sampler.)"""

    def __init__(self, denoiser, time_scale: float | None = None):
        self.denoiser, self.time_scale = denoiser, time_scale
        self.sigma_data = denoiser.sigma_data

    def init(self, key, x_example, **kw):
        return self.denoiser.init(key, x_example, **kw)

    def F(self, params, x_t, t, **kw) -> jax.Array:
        """F_theta(x_t / sigma_d, t) (`network_velocity`)."""
        return network_velocity(self.denoiser, params, x_t, t, self.time_scale, **kw)

    def f(self, params, x_t, t, **kw) -> jax.Array:
        """The consistency function at TrigFlow time t."""
        t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
        return consistency(x_t, t, self.F(params, x_t, t, **kw), self.sigma_data)

    def __call__(self, params, x, sigma, **kw):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        x_t, t = from_edm(x, sigma, self.sigma_data)
        return self.f(params, x_t, t, **kw)
