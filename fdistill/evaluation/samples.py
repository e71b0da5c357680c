"""Sample-quality metrics against an analytic Gaussian mixture (distillation notes section 6.3).

All take model samples `x` [n, d] (NumPy or JAX) and the true `GMM`; use n >= 4096.
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from fdistill.data.gmm import GMM

MIN_EVAL_SAMPLES = 4096


def _nearest_mode(x: np.ndarray, gmm: GMM) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest mean, distance to it in units of that mode's std)."""
    means, stds = np.asarray(gmm.means), np.asarray(gmm.stds)
    d = np.sqrt(((x[:, None, :] - means[None]) ** 2).sum(-1)) / stds[None]
    idx = d.argmin(1)
    return idx, d[np.arange(len(x)), idx]


def mode_histogram(x, gmm: GMM) -> np.ndarray:
    """Fraction of samples whose nearest mode (in std units) is k, shape [K]."""
    idx, _ = _nearest_mode(np.asarray(x, np.float64), gmm)
    return np.bincount(idx, minlength=gmm.num_modes) / len(idx)


def mode_coverage(x, gmm: GMM, min_share: float = 0.25) -> float:
    """Fraction of modes receiving at least `min_share` of their expected share of samples
    (samples counted for a mode when within 3 std of it)."""
    x = np.asarray(x, np.float64)
    idx, dist = _nearest_mode(x, gmm)
    counts = np.bincount(idx[dist <= 3.0], minlength=gmm.num_modes)
    expected = np.asarray(gmm.weights, np.float64) * len(x)
    return float(np.mean(counts >= min_share * expected))


def mode_weight_tv(x, gmm: GMM) -> float:
    """Total variation between the empirical nearest-mode histogram and the true weights."""
    return float(0.5 * np.abs(mode_histogram(x, gmm) - np.asarray(gmm.weights, np.float64)).sum())


def high_quality_frac(x, gmm: GMM) -> float:
    """Fraction of samples within 3 mode stds of some mean."""
    _, dist = _nearest_mode(np.asarray(x, np.float64), gmm)
    return float(np.mean(dist <= 3.0))


def mmd_rbf(x, y, bandwidths=(0.1, 0.5, 1.0, 2.0, 5.0), max_n: int = 4096) -> float:
    """Biased MMD^2 estimate with a sum of RBF kernels k(a,b) = exp(-|a-b|^2 / (2 h^2))."""
    x = jnp.asarray(np.asarray(x, np.float32)[:max_n])
    y = jnp.asarray(np.asarray(y, np.float32)[:max_n])
    return float(_mmd(x, y, jnp.asarray(bandwidths, jnp.float32)))


@jax.jit
def _mmd(x, y, bandwidths):
    def k(a, b):
        sq = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2 * a @ b.T
        sq = jnp.maximum(sq, 0.0)
        return jnp.sum(jnp.exp(-sq[None] / (2 * bandwidths[:, None, None] ** 2)), 0)

    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def gmm_sample_metrics(x, gmm: GMM, reference) -> dict[str, float]:
    """mode_coverage, mode_weight_tv, high_quality_frac and mmd (against `reference` data samples)."""
    x = np.asarray(x, np.float64)
    finite = np.all(np.isfinite(x), axis=1)
    x = np.where(finite[:, None], x, 1e6)  # a diverged sample counts as far from every mode
    return {
        "nonfinite_frac": float(1.0 - finite.mean()),
        "mode_coverage": mode_coverage(x, gmm),
        "mode_weight_tv": mode_weight_tv(x, gmm),
        "high_quality_frac": high_quality_frac(x, gmm),
        "mmd": mmd_rbf(x, reference),
    }


def by_step_count(configured: int, metrics_at, counts=(1, 2, 4)) -> dict[str, float]:
    """Metrics of one network sampled with several step counts: `metrics_at(k)` for k in `counts` and
    `configured`; the configured count's keys as they are, the others' prefixed `steps<k>/`."""
    out = {}
    for k in sorted({*counts, int(configured)}):
        m = metrics_at(k)
        out.update(m if k == configured else {f"steps{k}/{name}": v for name, v in m.items()})
    return out
