"""Frechet distance between Gaussian fits of features (Heusel et al. 2017, arXiv 1706.08500, eq. 6):

    FD = ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2}).

With Inception-v3 pool features this is FID; here the feature extractor is pluggable (any function
from a batch of samples to a [n, d] array), e.g. the in-project digits classifier
(`fdistill.evaluation.digits_classifier`). Tr((S_x S_y)^{1/2}) is computed as the sum of square roots
of the eigenvalues of the symmetric PSD matrix S_x^{1/2} S_y S_x^{1/2} (similar to S_x S_y), which
avoids the complex round-off of a general matrix square root.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

FeatureFn = Callable[[np.ndarray], np.ndarray]


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], unbiased covariance [d, d]) of features [n, d], in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, d], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982; arXiv 1706.08500 eq. 6)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}")
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    fd = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))


def frechet_distance_features(features_x, features_y) -> float:
    """FD between Gaussian fits of two feature sets [n, d] and [m, d]."""
    return frechet_distance(*gaussian_fit(features_x), *gaussian_fit(features_y))


def frechet_distance_samples(x, y, feature_fn: FeatureFn) -> float:
    """FD between samples x and y in the features of `feature_fn` (the pluggable extractor)."""
    return frechet_distance_features(feature_fn(x), feature_fn(y))
