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


def mode_shapes(x, gmm: GMM) -> dict[str, np.ndarray]:
    """Per mode k (arrays of shape [K]): its true `weight`, the `share` of samples whose nearest mode
    is k, `within3` (the fraction of those within 3 of its stds: high-quality), and `major` / `minor`,
    the standard deviations of those samples along their covariance's largest and smallest principal
    axes, in units of the mode's std (1 and 1 for the mixture itself, up to the truncation of its
    Voronoi cell). A mode drawn as an arc has major >> 1 (`experiments/studies/mode_shapes.py`).
    Modes with fewer than 3 samples get NaN shapes."""
    x = np.asarray(x, np.float64)
    idx, dist = _nearest_mode(x, gmm)
    means, stds = np.asarray(gmm.means, np.float64), np.asarray(gmm.stds, np.float64)
    k_modes = gmm.num_modes
    major, minor, within3 = (np.full(k_modes, np.nan) for _ in range(3))
    for k in range(k_modes):
        mine = idx == k
        if mine.sum() >= 1:
            within3[k] = np.mean(dist[mine] <= 3.0)
        if mine.sum() >= 3:
            eig = np.linalg.eigvalsh(np.cov((x[mine] - means[k]).T).reshape(x.shape[1], x.shape[1]))
            major[k], minor[k] = np.sqrt(eig[-1]) / stds[k], np.sqrt(max(eig[0], 0.0)) / stds[k]
    return {"weight": np.asarray(gmm.weights, np.float64), "share": np.bincount(idx, minlength=k_modes) / len(x),
            "within3": within3, "major": major, "minor": minor}


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
