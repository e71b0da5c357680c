"""The pure pieces of the f-distill generator update (arXiv 2502.15681; FastGen conventions).

    r   = clip(exp(clip(logit, -c, c)), r_min, r_max)           (stop-gradient)
    r  <- r / mean(r in its noise-level bin)                     (normalisation stage 1)
    h   = h(r) / mean_batch h(r)                                 (normalisation stage 2)
    w   = 1 / mean_features |x - D_real|                         (DMD per-sample weight)
    g   = stopgrad((D_fake - D_real) w h)
    L_G = 0.5 mean((x - stopgrad(x - g))^2) + lambda_gan softplus(-logit(x_t))
    L_D = softplus(-logit(real_t)) + softplus(logit(fake_t))

The generator gradient of 2502.15681 Thm. 1 is the teacher/student score difference weighted by
h(r) = f''(r) r^2; in EDM denoiser form grad log p_t - grad log q_t = (D_real - D_fake) / sigma^2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fdistill import diffusion, divergences

RATIO_BINNINGS = ("index", "sigma")


def ratio_from_logits(logits: jax.Array, logit_clip: float, r_min: float, r_max: float) -> jax.Array:
    """r = clip(exp(clip(logit, -c, c)), r_min, r_max): the density-ratio trick, exp(logit) = p/q at
    the optimum of the logistic loss (FastGen `_get_f_div_weighting_h`)."""
    return jnp.clip(jnp.exp(jnp.clip(logits, -logit_clip, logit_clip)), r_min, r_max)


def ratio_bin_index(mode: str, num_bins: int, index: jax.Array, sigma: jax.Array, index_lo: int, index_hi: int,
                    sigma_min: float, sigma_max: float) -> jax.Array:
    """The noise-level bin of each sample for normalisation stage 1.

    'index': `num_bins` equal-count bins of the Karras grid indices [index_lo, index_hi] (indices are
    drawn uniformly, so each bin receives the same share of samples). 'sigma': FastGen's equal-width
    bins of sigma over [sigma_min, sigma_max] (`f_distill.py`); with a Karras grid most samples fall
    into the first bin.
    """
    if mode == "index":
        span = index_hi - index_lo + 1
        return jnp.minimum((index - index_lo) * num_bins // span, num_bins - 1)
    width = (sigma_max - sigma_min) / num_bins
    return jnp.clip(jnp.floor((sigma - sigma_min) / width).astype(jnp.int32), 0, num_bins - 1)


def bin_normalize(r: jax.Array, bin_idx: jax.Array, bins: jax.Array, ema: float = 0.0):
    """Normalisation stage 1: r / (mean of r in its noise-level bin), the bin means being an EMA
    (rate `ema`; 0 = this batch only) updated where the batch has samples. Returns (r_n, bins)."""
    num_bins = bins.shape[0]
    onehot = jax.nn.one_hot(bin_idx, num_bins, dtype=r.dtype)  # [B, nb]
    count = onehot.sum(0)
    mean = (onehot * r[:, None]).sum(0) / jnp.maximum(count, 1.0)
    bins = jnp.where(count > 0, ema * bins + (1.0 - ema) * mean, bins)
    return r / (bins[bin_idx] + 1e-6), bins


def normalized_h(div: divergences.Divergence, r: jax.Array) -> jax.Array:
    """Normalisation stage 2: h(r) / mean_batch h(r) (exactly 1 for the reverse KL)."""
    h = jnp.broadcast_to(div.h(r), r.shape).astype(jnp.float32)
    return h / jnp.maximum(jnp.mean(h), 1e-12)


def teacher_error_weight(x: jax.Array, d_real: jax.Array) -> jax.Array:
    """DMD per-sample weight w = 1 / mean_features |x - D_real(x_t)| (arXiv 2311.18828, eq. 8)."""
    err = jnp.mean(jnp.abs(x - d_real), axis=tuple(range(1, x.ndim)))
    return 1.0 / (err + 1e-6)


def dm_loss(x: jax.Array, d_real: jax.Array, d_fake: jax.Array, h: jax.Array, w: jax.Array) -> jax.Array:
    """0.5 mean((x - sg(x - g))^2), g = sg((D_fake - D_real) w h): its gradient in x is g / x.size,
    i.e. descent moves x along h (D_real - D_fake) = h sigma^2 (grad log p_t - grad log q_t)."""
    g = jax.lax.stop_gradient((d_fake - d_real) * diffusion.expand(w * h, x))
    return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - g)) ** 2)


def disc_loss(logit_real: jax.Array, logit_fake: jax.Array) -> jax.Array:
    """Logistic (non-saturating GAN) discriminator loss softplus(-l_real) + softplus(l_fake)."""
    return jnp.mean(jax.nn.softplus(-logit_real)) + jnp.mean(jax.nn.softplus(logit_fake))


def gan_generator_loss(logit_fake: jax.Array) -> jax.Array:
    """Non-saturating generator GAN loss softplus(-logit(G(z)_t))."""
    return jnp.mean(jax.nn.softplus(-logit_fake))


def disc_metrics(logit_real: jax.Array, logit_fake: jax.Array) -> dict[str, jax.Array]:
    return {"loss_disc": disc_loss(logit_real, logit_fake),
            "disc/logit_real": jnp.mean(logit_real),
            "disc/logit_fake": jnp.mean(logit_fake),
            "disc/accuracy": 0.5 * (jnp.mean(logit_real > 0) + jnp.mean(logit_fake < 0))}
