"""Exact critics on a known teacher: the fake score and the density ratio of a student's samples.

A student q is known only through samples. For a batch {y_j}_{j<N} of student samples (drawn
independently of the samples being updated, stop-gradient), the noised empirical measure is itself
a mixture, so its score and, with the teacher's exact noised density p_sigma, the ratio are exact:

    q_sigma(x)        = (1/N) sum_j N(x; y_j, sigma^2 I)
    D_fake(x; sigma)  = E_q[y | x_sigma = x] = sum_j softmax_j(-|x - y_j|^2 / (2 sigma^2)) y_j
    grad log q_sigma  = (D_fake(x; sigma) - x) / sigma^2                                   (Tweedie)
    log r_sigma(x)    = log p_sigma(x) - log q_sigma(x).

They replace the learned fake score and the discriminator's logit in the f-distill generator update
(arXiv 2502.15681, Thm. 1) in `critics.OracleCritic`, so that a study can tell the critics' errors
from the generator's. Pure, jittable functions of (samples, x, sigma); `sigma` is a scalar or one
value per row of `x`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _log_kernel(samples: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """log N(x_i; y_j, sigma_i^2 I) for x [M, d], samples [N, d]; returns [M, N]."""
    d = x.shape[-1]
    s2 = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])[:, None] ** 2
    # |x - y|^2 expanded (no [M, N, d] intermediate), clipped at 0 against cancellation.
    sq = jnp.maximum(jnp.sum(x**2, -1)[:, None] + jnp.sum(samples**2, -1)[None, :] - 2.0 * x @ samples.T, 0.0)
    return -0.5 * sq / s2 - 0.5 * d * jnp.log(2.0 * jnp.pi * s2)


def kde_log_prob(samples: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """log q_sigma(x) for q_sigma = (1/N) sum_j N(y_j, sigma^2 I); samples [N, d], x [M, d] -> [M]."""
    return jax.nn.logsumexp(_log_kernel(samples, x, sigma), axis=-1) - jnp.log(samples.shape[0])


def kde_denoiser(samples: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """The exact denoiser of the noised empirical measure (module docstring); [M, d]."""
    return jax.nn.softmax(_log_kernel(samples, x, sigma), axis=-1) @ samples


def kde_score(samples: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """grad_x log q_sigma(x) = (D_fake(x; sigma) - x) / sigma^2; [M, d]."""
    s2 = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])[:, None] ** 2
    return (kde_denoiser(samples, x, sigma) - x) / s2


def log_ratio(teacher_log_prob, samples: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """log r_sigma(x) = log p_sigma(x) - log q_sigma(x), with `teacher_log_prob(x, sigma) -> [M]` the
    exact noised teacher log density (e.g. `GMM.log_prob`); [M]."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
    return teacher_log_prob(x, sigma) - kde_log_prob(samples, x, sigma)
