"""Analytic Gaussian-mixture teacher with exact noised densities, scores and denoisers.

p_0(x) = sum_k pi_k N(x; mu_k, s^2 I). Under x_sigma = x_0 + sigma eps (EDM noising):
  p_sigma(x)        = sum_k pi_k N(x; mu_k, (s^2 + sigma^2) I)
  grad log p_sigma  = sum_k w_k(x) (mu_k - x) / (s^2 + sigma^2)
  D(x; sigma)       = E[x_0 | x_sigma = x] = x + sigma^2 grad log p_sigma(x)
with w_k(x) the posterior mode responsibilities (a softmax). See distillation notes section 6.1.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.configs import ConfigError

LAYOUTS = ("grid", "ring", "random")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMM:
    """An isotropic mixture. `means` [K, d], `weights` [K] (sum 1), `stds` [K]. A pytree."""

    means: jax.Array
    weights: jax.Array
    stds: jax.Array

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_components(self, x: jax.Array, sigma) -> jax.Array:
        """log pi_k + log N(x; mu_k, c_k I) for x [..., d]; returns [..., K]."""
        sigma = jnp.asarray(sigma, x.dtype)[..., None]
        c = self.stds**2 + sigma**2  # [..., K]
        sq = jnp.sum((x[..., None, :] - self.means) ** 2, axis=-1)
        d = x.shape[-1]
        return jnp.log(self.weights) - 0.5 * sq / c - 0.5 * d * jnp.log(2 * jnp.pi * c)

    def log_prob(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """log p_sigma(x) for x [..., d] and sigma broadcastable to x[..., 0]."""
        return jax.nn.logsumexp(self._log_components(x, sigma), axis=-1)

    def responsibilities(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """Posterior w_k(x) = p(mode k | x_sigma = x), shape [..., K]."""
        return jax.nn.softmax(self._log_components(x, sigma), axis=-1)

    def score(self, x: jax.Array, sigma=0.0) -> jax.Array:
        """Exact grad_x log p_sigma(x) = sum_k w_k (mu_k - x) / (s_k^2 + sigma^2)."""
        sigma = jnp.asarray(sigma, x.dtype)[..., None]
        w = self.responsibilities(x, sigma[..., 0])
        c = self.stds**2 + sigma**2
        return jnp.sum((w / c)[..., None] * (self.means - x[..., None, :]), axis=-2)

    def denoise(self, x: jax.Array, sigma) -> jax.Array:
        """Exact EDM denoiser D(x; sigma) = x + sigma^2 score(x, sigma) (Tweedie)."""
        s = jnp.asarray(sigma, x.dtype)[..., None]
        return x + s**2 * self.score(x, sigma)

    def velocity(self, x_t: jax.Array, t) -> jax.Array:
        """Exact flow-matching velocity E[eps - x_0 | x_t] under x_t = (1 - t) x_0 + t eps
        (`fdistill.flow`), in closed form for every t in [0, 1]: given mode k, x_t ~ N((1 - t) mu_k, c_k I)
        with c_k = (1 - t)^2 s_k^2 + t^2, and with r_k = x_t - (1 - t) mu_k

            E[x_0 | x_t, k] = mu_k + (1 - t) s_k^2 r_k / c_k,    E[eps | x_t, k] = t r_k / c_k,

        averaged with the posterior mode weights at level t."""
        t = jnp.asarray(t, x_t.dtype)[..., None]
        c = (1 - t) ** 2 * self.stds**2 + t**2  # [..., K]
        r = x_t[..., None, :] - (1 - t)[..., None] * self.means  # [..., K, d]
        d = x_t.shape[-1]
        logw = jnp.log(self.weights) - 0.5 * jnp.sum(r**2, -1) / c - 0.5 * d * jnp.log(2 * jnp.pi * c)
        w = jax.nn.softmax(logw, axis=-1)
        per_mode = ((t - (1 - t) * self.stds**2) / c)[..., None] * r - self.means
        return jnp.sum(w[..., None] * per_mode, axis=-2)

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """n exact samples from p_0."""
        k1, k2 = jax.random.split(key)
        idx = jax.random.choice(k1, self.num_modes, (n,), p=self.weights)
        eps = jax.random.normal(k2, (n, self.dim))
        return self.means[idx] + self.stds[idx, None] * eps

    def assign_modes(self, x: jax.Array) -> jax.Array:
        """Index of the most responsible mode for each sample at sigma = 0."""
        return jnp.argmax(self._log_components(x, 0.0), axis=-1)

    def sample_numpy(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n exact samples drawn with NumPy (host-side data pipelines)."""
        means, weights, stds = (np.asarray(a, np.float64) for a in (self.means, self.weights, self.stds))
        idx = rng.choice(len(weights), size=n, p=weights / weights.sum())
        return (means[idx] + stds[idx, None] * rng.standard_normal((n, means.shape[1]))).astype(np.float32)


def mode_weights(num_modes: int, imbalance: float) -> np.ndarray:
    """Geometric weights in the mode index with max/min ratio `imbalance` (1 = equal)."""
    if imbalance < 1:
        raise ConfigError(f"config.data.imbalance must be >= 1 (max/min weight ratio), got {imbalance}")
    if num_modes == 1:
        return np.ones(1)
    w = imbalance ** (-np.arange(num_modes) / (num_modes - 1))
    return w / w.sum()


def mode_means(layout: str, num_modes: int, dim: int, radius: float, seed: int) -> np.ndarray:
    """Mode centres: a square grid spanning [-radius, radius] (first two dims), a ring of the given
    radius (first two dims), or uniform random in the cube [-radius, radius]^dim."""
    if layout not in LAYOUTS:
        raise ConfigError(f"config.data.layout={layout!r} is not known; allowed: {list(LAYOUTS)}")
    means = np.zeros((num_modes, dim))
    if layout == "ring":
        if dim < 2:
            raise ConfigError("config.data.layout='ring' needs config.data.dim >= 2")
        angle = 2 * np.pi * np.arange(num_modes) / num_modes
        means[:, 0], means[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    elif layout == "grid":
        side = int(round(np.sqrt(num_modes)))
        if side * side != num_modes or dim < 2:
            raise ConfigError(
                f"config.data.layout='grid' needs a square config.data.num_modes and dim >= 2, got {num_modes}"
            )
        ticks = np.linspace(-radius, radius, side) if side > 1 else np.zeros(1)
        gx, gy = np.meshgrid(ticks, ticks, indexing="xy")
        means[:, 0], means[:, 1] = gx.ravel(), gy.ravel()
    else:
        means = np.random.default_rng(seed).uniform(-radius, radius, size=(num_modes, dim))
    return means


def from_config(data_config) -> GMM:
    """Builds the GMM from `config.data` (layout, num_modes, dim, mode_std, radius, imbalance, seed).

    The order of weights is shuffled with `seed` for the grid/random layouts so small modes are not
    all on one side; on a ring they decrease around the circle.
    """
    c = data_config
    means = mode_means(c.layout, c.num_modes, c.get("dim", 2), c.radius, c.get("seed", 0))
    weights = mode_weights(c.num_modes, c.get("imbalance", 1.0))
    if c.layout != "ring":
        weights = np.random.default_rng(c.get("seed", 0) + 1).permutation(weights)
    stds = np.full(c.num_modes, c.mode_std)
    return GMM(
        means=jnp.asarray(means, jnp.float32),
        weights=jnp.asarray(weights, jnp.float32),
        stds=jnp.asarray(stds, jnp.float32),
    )
