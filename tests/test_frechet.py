"""Frechet distance against closed forms, k-NN precision/recall against brute force and limit cases,
and class entropy."""
import numpy as np
import pytest
import scipy.linalg

from fdistill.evaluation import feature_metrics, frechet


def test_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # = 7.25 + 4 + 1 + 0
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expect, rel=1e-10)
    assert expect == pytest.approx(12.25)


def test_full_covariances_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (1, 2, 5):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the general (non-symmetric) formula
        expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-7)
        # Symmetric in its arguments.
        assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expect, rel=1e-7)


def test_identical_features_give_zero_and_samples_approach_the_closed_form():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 8))
    assert frechet.frechet_distance_features(f, f.copy()) == pytest.approx(0.0, abs=1e-8)
    # Gaussian samples: the plug-in estimate approaches the closed form.
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5]), np.diag([2.0, 2.0, 0.5])
    x = rng.multivariate_normal(mu1, s1, 200_000)
    y = rng.multivariate_normal(mu2, s2, 200_000)
    expect = 1.0 + (1 - np.sqrt(2)) ** 2
    assert frechet.frechet_distance_features(x, y) == pytest.approx(expect, rel=0.03)


def test_pluggable_feature_function():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 4, 4, 1)), rng.normal(0.5, 1.0, size=(300, 4, 4, 1))
    feature_fn = lambda imgs: np.asarray(imgs).reshape(len(imgs), -1)[:, :5]  # noqa: E731
    got = frechet.frechet_distance_samples(x, y, feature_fn)
    assert got == pytest.approx(frechet.frechet_distance_features(feature_fn(x), feature_fn(y)))
    assert got > 5 * 0.25 * 0.5  # mean shift 0.5 in each of 5 dimensions


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="features must be"):
        frechet.gaussian_fit(np.zeros((1, 4)))


def test_knn_radii_and_precision_recall_against_brute_force():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(60, 3)), rng.normal(0.7, 1.3, size=(50, 3))
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    radii = np.sort(d_rr, axis=1)[:, 3]  # k = 3, column 0 is the point itself
    np.testing.assert_allclose(feature_metrics.knn_radii(real, 3), radii, rtol=1e-9)
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    precision = np.mean((d_fr <= radii[None]).any(1))
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    radii_f = np.sort(d_ff, axis=1)[:, 3]
    recall = np.mean((d_fr.T <= radii_f[None]).any(1))
    p, r = feature_metrics.precision_recall(real, fake, k=3)
    assert (p, r) == (pytest.approx(precision), pytest.approx(recall))
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_limit_cases():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 2))
    assert feature_metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert feature_metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Mode dropping: samples from one half of the data are precise but miss the other half.
    half = real[real[:, 0] > 0]
    p, r = feature_metrics.precision_recall(real, half)
    assert p > 0.95 and r < 0.65


def test_class_entropy():
    assert feature_metrics.class_entropy(np.arange(1000) % 10, 10) == pytest.approx(np.log(10))
    assert feature_metrics.class_entropy(np.full(50, 3), 10) == 0.0
    assert feature_metrics.class_entropy(np.array([0, 1]), 10) == pytest.approx(np.log(2))


def test_fd_infinity_removes_the_finite_sample_bias():
    """Gaussians with equal means and diagonal covariances a, b: FD = sum (sqrt a - sqrt b)^2. Over 30
    independent fake sets of 1000, the plug-in FD is biased upward by many standard errors; FD-infinity
    (arXiv 1911.07023) is unbiased within 3 standard errors. Returning the plug-in value, or a wrong
    line, fails the second assertion."""
    d = 16
    a = np.linspace(0.5, 2.0, d)
    b = a[::-1]
    exact = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    real = np.random.default_rng(0).normal(size=(200_000, d)) * np.sqrt(a)  # real-side bias ~ 1e-4
    plain, inf = [], []
    for seed in range(30):
        fake = np.random.default_rng(seed + 1).normal(size=(1000, d)) * np.sqrt(b)
        plain.append(frechet.frechet_distance_features(real, fake) - exact)
        fit = frechet.frechet_distance_infinity(real, fake, seed=seed)
        inf.append(fit.value - exact)
        assert fit.slope > 0 and fit.sizes[0] == 160 and fit.sizes[-1] == 1000 and len(fit.fds) == 15
    plain, inf = np.array(plain), np.array(inf)
    se_plain, se_inf = plain.std() / np.sqrt(30), inf.std() / np.sqrt(30)
    assert plain.mean() > 5 * se_plain
    assert abs(inf.mean()) < 3 * se_inf < plain.mean()


def test_fd_infinity_is_deterministic_and_needs_twenty_samples_per_dimension():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(500, 4)), rng.normal(0.3, 1.0, size=(400, 4))
    assert frechet.frechet_distance_infinity(real, fake)[:2] == frechet.frechet_distance_infinity(real, fake)[:2]
    with pytest.raises(ValueError, match=r"at least 20 x dim fake features \[n, dim\]; got shape \(79, 4\)"):
        frechet.frechet_distance_infinity(real, fake[:79])
    frechet.frechet_distance_infinity(real, fake[:80])
    assert "fd_inf" in feature_metrics.feature_sample_metrics(real, fake[:80])
    assert "fd_inf" not in feature_metrics.feature_sample_metrics(real, fake[:79])


def test_class_tv_against_hand_computed_values():
    data = np.array([0, 0, 1, 1])  # q = (0.5, 0.5, 0)
    assert feature_metrics.class_tv(np.array([0, 0, 1, 1]), data, 3) == 0.0
    assert feature_metrics.class_tv(np.array([2, 2, 2, 2]), data, 3) == pytest.approx(1.0)
    # p = (0.75, 0, 0.25): 1/2 (0.25 + 0.5 + 0.25) = 0.5
    assert feature_metrics.class_tv(np.array([0, 0, 0, 2]), data, 3) == pytest.approx(0.5)
