"""Sample metrics in a feature space: Frechet distance (plug-in and FD-infinity), k-NN precision/recall,
class entropy and class TV.

* Precision / recall (Kynkaanniemi et al. 2019, arXiv 1904.06991, eqs. 1-2): the real manifold is
  the union of balls around each real feature with radius its distance to its k-th nearest real
  neighbour (k = 3); precision is the fraction of generated features inside the real manifold,
  recall the fraction of real features inside the generated manifold (built the same way).
* Class entropy: entropy (nats) of the histogram of a classifier's argmax predictions on samples;
  log(num_classes) when every class is produced equally often, 0 when one class is produced.
* Class TV: total variation 1/2 sum_k |p_k - q_k| between that histogram p and the data's class
  frequencies q (the image analogue of the mixture's mode-weight TV).
"""
from __future__ import annotations

import numpy as np

from fdistill.evaluation import frechet


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, chunk: int = 2048) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row."""
    f = np.asarray(features, np.float64)
    if len(f) <= k:
        raise ValueError(f"need more than k={k} feature vectors, got {len(f)}")
    out = np.empty(len(f))
    for s in range(0, len(f), chunk):
        d = _sq_dists(f[s:s + chunk], f)
        out[s:s + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
    return out


def _inside(query: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each query row: is it within radius of at least one centre?"""
    out = np.empty(len(query), bool)
    for s in range(0, len(query), chunk):
        out[s:s + chunk] = (_sq_dists(query[s:s + chunk], centres) <= radii[None, :]).any(1)
    return out


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (arXiv 1904.06991) with k-NN manifolds."""
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    precision = _inside(fake, real, knn_radii(real, k)).mean()
    recall = _inside(real, fake, knn_radii(fake, k)).mean()
    return float(precision), float(recall)


def class_histogram(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Frequencies [num_classes] of the class indices."""
    return np.bincount(np.asarray(classes, np.int64), minlength=num_classes) / max(len(classes), 1)


def class_entropy(predicted: np.ndarray, num_classes: int) -> float:
    """Entropy (nats) of the histogram of predicted class indices."""
    p = class_histogram(predicted, num_classes)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def class_tv(predicted: np.ndarray, data_classes: np.ndarray, num_classes: int) -> float:
    """Total variation between the histograms of predicted classes and of the data's classes."""
    p, q = class_histogram(predicted, num_classes), class_histogram(data_classes, num_classes)
    return float(0.5 * np.abs(p - q).sum())


def feature_sample_metrics(real_features, fake_features, k: int = 3, max_pr: int | None = None,
                           prefix: str = "fd") -> dict[str, float]:
    """{prefix: FD, prefix_inf: FD-infinity, 'precision', 'recall'}.

    FD is the plug-in value on all fake features, biased upward by about c / n; FD-infinity
    (`frechet.frechet_distance_infinity`) removes that bias and is the one to compare models with, on
    equal and large sample counts. It is left out below `frechet.FD_INF_SAMPLES_PER_DIM` x dim fake
    features, where the extrapolation is not valid. Precision/recall use at most `max_pr` fake
    features (default: as many as real ones, since the k-NN radii shrink with the set size)."""
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    n = min(len(fake), max_pr or len(real))
    precision, recall = precision_recall(real, fake[:n], k)
    metrics = {prefix: frechet.frechet_distance_features(real, fake), "precision": precision, "recall": recall}
    if len(fake) >= frechet.FD_INF_SAMPLES_PER_DIM * fake.shape[1]:
        metrics[f"{prefix}_inf"] = frechet.frechet_distance_infinity(real, fake).value
    return metrics
