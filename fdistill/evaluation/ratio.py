"""Exact density ratios on the Gaussian mixture, to score a learned discriminator's log r.

On the GMM the noised teacher marginal p_sigma is known exactly (`GMM.log_prob`). For a batch of N
student samples {x_i}, the noised student distribution of that batch is itself a mixture,
q_sigma(y) = (1/N) sum_i N(y; x_i, sigma^2 I) (distillation notes section 6.1), so

    log r_sigma(y) = log p_sigma(y) - log q_sigma(y)

is exact for the batch measure. It tends to the student's population ratio when sigma is large
compared with the spacing of the batch points, which is why `ratio_spearman` uses moderate sigmas.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.data.gmm import GMM


@jax.jit
def batch_mixture_log_prob(batch: jax.Array, y: jax.Array, sigma: jax.Array) -> jax.Array:
    """log q_sigma(y) for q_sigma = (1/N) sum_i N(x_i, sigma^2 I); batch [N, d], y [M, d], sigma [M]."""
    n, d = batch.shape
    sq = jnp.sum((y[:, None, :] - batch[None, :, :]) ** 2, axis=-1)  # [M, N]
    s2 = (sigma**2)[:, None]
    log_k = -0.5 * sq / s2 - 0.5 * d * jnp.log(2 * jnp.pi * s2)
    return jax.nn.logsumexp(log_k, axis=1) - jnp.log(n)


def exact_log_ratio(gmm: GMM, batch, y, sigma) -> jax.Array:
    """log p_sigma(y) - log q_sigma(y) with q_sigma the noised batch mixture (module docstring)."""
    batch, y = jnp.asarray(batch, jnp.float32), jnp.asarray(y, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), y.shape[:1])
    return gmm.log_prob(y, sigma) - batch_mixture_log_prob(batch, y, sigma)


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks; ties share a rank)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.asarray(a, np.float64)), rankdata(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
