"""EDM diffusion core (Karras et al. 2022, arXiv 2206.00364).

Noising is x_sigma = x_0 + sigma * eps (variance exploding). Every function is jittable and
vmappable; `sigma` broadcasts against the trailing (feature) axes of `x` via `expand`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # D(x, sigma) -> x0 estimate

SAMPLERS = ("heun", "euler")


def expand(sigma: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example sigma [B] (or scalar) so it broadcasts against x [B, ...]."""
    sigma = jnp.asarray(sigma, dtype=x.dtype)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def preconditioning(sigma: jax.Array, sigma_data: float):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) for D(x) = c_skip x + c_out F(c_in x; c_noise)."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / jnp.sqrt(s2)
    c_in = 1.0 / jnp.sqrt(s2)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def precondition(net: Callable, x: jax.Array, sigma: jax.Array, sigma_data: float, **kw) -> jax.Array:
    """EDM eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), `net(x_in, c_noise, **kw)`."""
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    f = net(expand(c_in, x) * x, jnp.broadcast_to(c_noise, x.shape[:1]), **kw)
    return expand(c_skip, x) * x + expand(c_out, x) * f.astype(x.dtype)


def loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """EDM eq. 8 weighting lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_lognormal_sigma(key: jax.Array, shape, p_mean: float = -1.2, p_std: float = 1.2) -> jax.Array:
    """EDM training noise levels: ln sigma ~ N(P_mean, P_std^2)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> jax.Array:
    """EDM eq. 5: sigma_i for i = 0..N-1 (decreasing), followed by sigma_N = 0 (length N+1)."""
    i = jnp.arange(num_steps, dtype=jnp.float32)
    denom = max(num_steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return jnp.concatenate([s, jnp.zeros((1,), s.dtype)])


def sample(
    denoiser: Denoiser,
    noise: jax.Array,
    num_steps: int,
    *,
    sampler: str = "heun",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> jax.Array:
    """Deterministic EDM sampler (Algorithm 1). `noise` ~ N(0, I); Heun uses 2N-1 NFE, Euler N.

    The loop is a `lax.fori_loop`, so it jits once for any `num_steps` value fixed at trace time.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; allowed: {list(SAMPLERS)}")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    x0 = noise * sigmas[0]

    def body(i, x):
        s, s_next = (jnp.full(x.shape[:1], v) for v in (sigmas[i], sigmas[i + 1]))
        if sampler == "euler":
            return euler_step(denoiser, x, s, s_next)[0]
        return jax.lax.cond(sigmas[i + 1] > 0, lambda _: heun_step(denoiser, x, s, s_next),
                            lambda _: euler_step(denoiser, x, s, s_next)[0], None)

    return jax.lax.fori_loop(0, num_steps, body, x0)


def euler_step(denoiser: Denoiser, x: jax.Array, s: jax.Array, s_next: jax.Array):
    """(x at s_next, dx/dsigma at s) of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma,
    per-example levels s, s_next [B]."""
    d = (x - denoiser(x, s)) / expand(s, x)
    return x + expand(s_next - s, x) * d, d


def heun_step(denoiser: Denoiser, x: jax.Array, s: jax.Array, s_next: jax.Array) -> jax.Array:
    """Heun's step of the same ODE from s to s_next > 0 (EDM Algorithm 1, lines 5-8)."""
    x_euler, d = euler_step(denoiser, x, s, s_next)
    d2 = (x_euler - denoiser(x_euler, s_next)) / expand(s_next, x)
    return x + expand(s_next - s, x) * 0.5 * (d + d2)


def nfe(num_steps: int, sampler: str = "heun") -> int:
    """Network evaluations of `sample`: 2N-1 for Heun (no correction at the last step), N for Euler."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps
