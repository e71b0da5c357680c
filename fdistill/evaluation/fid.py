"""FID (Heusel et al. 2017, arXiv 1706.08500, eq. 6) on the FID Inception-v3's 2048-d pool features.

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

* `statistics(features) -> (mu, sigma)`: float64 mean and unbiased covariance (`np.cov`, as pytorch-fid).
* `save_statistics` / `load_statistics`: the reference-statistics format of pytorch-fid and EDM, an
  `.npz` with `mu` [d] and `sigma` [d, d].
* `fid(mu1, sigma1, mu2, sigma2)`: `fdistill.evaluation.frechet.frechet_distance` (no second copy).
  It takes Tr((S_1 S_2)^{1/2}) from the eigenvalues of the symmetric S_1^{1/2} S_2 S_1^{1/2}, where
  pytorch-fid's `calculate_frechet_distance` uses `scipy.linalg.sqrtm(S_1 S_2)` (retrying with 1e-6
  added to the diagonals if that is not finite, and dropping an imaginary part). Same quantity; on
  2048-d covariances from 3000 samples the two agree to 1e-14 relative. The eigen route never needs
  the eps retry and clips the result at 0 (pytorch-fid can return tiny negative values).
* `inception(x)`: the `config.data.feature_fn` entry point, 'fdistill.evaluation.fid:inception'
  (metric name `fd_inception`): images [n, H, W, C] in [-1, 1] -> [n, 2048] float32 features, with the
  weights file given once by `configure_inception(path)` (how `config.eval.inception_weights` reaches
  it) or else the environment variable `FDISTILL_INCEPTION_WEIGHTS`.
"""
from __future__ import annotations

import functools
import os
import zipfile

import numpy as np

from fdistill.evaluation import frechet

WEIGHTS_ENV = "FDISTILL_INCEPTION_WEIGHTS"
_configured: dict = {"path": "", "batch_size": 64, "quantize": True}


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu [d], sigma [d, d]) in float64 of features [n >= 2, d] (unbiased covariance, as pytorch-fid)."""
    return frechet.gaussian_fit(features)


def _check(mu, sigma, where: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{where}: need mu [d] and sigma [d, d], got mu {mu.shape} and sigma {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{where}: mu/sigma contain NaN or inf")
    return mu, sigma


def save_statistics(path: str | os.PathLike, mu, sigma) -> None:
    """Write reference statistics as `.npz` with keys `mu`, `sigma` (float64) to exactly `path`."""
    mu, sigma = _check(mu, sigma, f"save_statistics({os.fspath(path)!r})")
    with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to other names
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 from a pytorch-fid / EDM reference-statistics `.npz` (keys `mu`, `sigma`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics not found at {path!r} (an .npz with 'mu' [d] and "
                                "'sigma' [d, d], e.g. from fdistill.evaluation.fid.save_statistics, "
                                "pytorch-fid --save-stats, or EDM's fid.py ref)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive (FID statistics are an .npz with 'mu' [d] and 'sigma' [d, d])")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise ValueError(f"missing key(s) {missing}; found {sorted(z.files)}")
            mu, sigma = z["mu"], z["sigma"]
    except ValueError as e:
        raise ValueError(f"{path}: not FID reference statistics ({e})") from e
    except Exception as e:  # BadZipFile, pickle refusals, ...
        raise ValueError(f"{path}: not a readable .npz of FID statistics ({type(e).__name__}: {e})") from e
    return _check(mu, sigma, path)


def fid(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (arXiv 1706.08500 eq. 6)."""
    return frechet.frechet_distance(mu1, sigma1, mu2, sigma2)


def fid_from_features(features1, features2) -> float:
    """FID between the Gaussian fits of two feature sets [n, d], [m, d]."""
    return fid(*statistics(features1), *statistics(features2))


# --------------------------------------------------------------------------------------------------
# The feature_fn entry point
# --------------------------------------------------------------------------------------------------

def configure_inception(path: str | os.PathLike, batch_size: int = 64, quantize: bool = True) -> None:
    """Set the FID Inception weights file used by `inception` (call at start-up with
    `config.eval.inception_weights`). Fails now, not at the first evaluation, if the file is missing.
    `quantize`: round images to 8 bits first, as the standard pipelines see them (samples saved as
    PNG, `(x * 127.5 + 128).clip(0, 255).astype(uint8)` in EDM; pytorch-fid reads uint8 files)."""
    from fdistill.evaluation import inception as inception_lib

    path = os.fspath(path)
    if not path or not os.path.isfile(path):
        inception_lib.load_state_dict(path)  # raises FileNotFoundError with where the file comes from
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _configured.update(path=os.path.abspath(path), batch_size=int(batch_size), quantize=bool(quantize))


def inception_weights_path() -> str:
    """The configured weights file (configure_inception, else $FDISTILL_INCEPTION_WEIGHTS); a clear error if none."""
    path = _configured["path"] or os.environ.get(WEIGHTS_ENV, "")
    if not path:
        from fdistill.evaluation import inception as inception_lib

        raise FileNotFoundError(
            "FID features need the Inception weights: set config.eval.inception_weights=FILE (or the "
            f"environment variable {WEIGHTS_ENV}). {inception_lib.WEIGHTS_HELP}")
    return path


@functools.lru_cache(maxsize=2)
def _extractor(path: str, batch_size: int):
    from fdistill.evaluation import inception as inception_lib

    return inception_lib.InceptionFeatures.from_path(path, batch_size)


def inception(x) -> np.ndarray:
    """`config.data.feature_fn = 'fdistill.evaluation.fid:inception'`: images [n, H, W, C] (C = 3, or 1
    repeated to RGB) in [-1, 1] -> FID pool features [n, 2048] float32: pytorch-fid's network, with its
    299x299 bilinear resize, on the images mapped to [0, 1] and (by default) rounded to 8 bits like
    saved PNGs; uint8 images (e.g. [-1, 1] data from uint8 records) pass the rounding unchanged."""
    x = np.asarray(x, np.float32)
    extractor = _extractor(inception_weights_path(), _configured["batch_size"])
    return extractor(to_unit_images(x, _configured["quantize"]))


def to_unit_images(x, quantize: bool = True) -> np.ndarray:
    """[-1, 1] images -> [0, 1]; with `quantize`, EDM's uint8 conversion floor(x * 127.5 + 128) / 255."""
    x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0)
    if quantize:
        return (np.clip(np.floor(x * 127.5 + 128.0), 0.0, 255.0) / 255.0).astype(np.float32)
    return ((np.clip(x, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32)
