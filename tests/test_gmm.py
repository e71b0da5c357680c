"""The analytic mixture is the oracle for every later check: test it against autodiff and sampling."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdistill.data import gmm as gmm_lib


def make(layout="ring", num_modes=8, imbalance=1.0, dim=2, seed=0):
    return gmm_lib.from_config(ml_collections.ConfigDict(dict(
        layout=layout, num_modes=num_modes, dim=dim, mode_std=0.2, radius=2.0, imbalance=imbalance, seed=seed)))


@pytest.mark.parametrize("layout,num_modes,dim", [("ring", 8, 2), ("grid", 9, 2), ("random", 5, 3)])
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.7, 10.0])
def test_score_is_grad_of_log_prob(layout, num_modes, dim, sigma):
    g = make(layout, num_modes, imbalance=3.0, dim=dim)
    x = 2.5 * jax.random.normal(jax.random.PRNGKey(1), (16, dim))
    auto = jax.vmap(jax.grad(lambda v: g.log_prob(v, sigma)))(x)
    np.testing.assert_allclose(g.score(x, sigma), auto, rtol=1e-4, atol=1e-4)


def test_per_example_sigma_and_tweedie_denoiser():
    g = make(imbalance=4.0)
    x = jax.random.normal(jax.random.PRNGKey(2), (6, 2))
    sig = jnp.array([0.01, 0.1, 0.5, 1.0, 3.0, 30.0])
    per_row = jnp.stack([g.denoise(x[i:i + 1], sig[i])[0] for i in range(6)])
    np.testing.assert_allclose(g.denoise(x, sig), per_row, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.denoise(x, sig), x + sig[:, None] ** 2 * g.score(x, sig), rtol=1e-5, atol=1e-6)
    # At huge noise the posterior mean is the data mean; at zero noise the identity.
    mean = jnp.sum(g.weights[:, None] * g.means, 0)
    np.testing.assert_allclose(g.denoise(x, 1e4), jnp.broadcast_to(mean, x.shape), atol=1e-3)


def test_log_prob_integrates_to_one_and_sampling_matches_weights():
    g = make(imbalance=5.0)
    ticks = np.linspace(-4, 4, 401)
    xx, yy = np.meshgrid(ticks, ticks)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1))
    mass = float(jnp.sum(jnp.exp(g.log_prob(pts, 0.3))) * (ticks[1] - ticks[0]) ** 2)
    assert abs(mass - 1.0) < 1e-3
    x = g.sample(jax.random.PRNGKey(0), 40000)
    hist = np.bincount(np.asarray(g.assign_modes(x)), minlength=8) / 40000
    np.testing.assert_allclose(hist, g.weights, atol=0.01)
    w = np.asarray(g.weights)
    assert w.max() / w.min() == pytest.approx(5.0, rel=1e-4)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="layout.*allowed.*grid.*ring.*random"):
        make(layout="spiral")
    with pytest.raises(ValueError, match="imbalance"):
        make(imbalance=0.5)
    with pytest.raises(ValueError, match="square"):
        make(layout="grid", num_modes=8)


def test_mode_shapes_of_the_mixture_and_of_a_stretched_mode():
    """`mode_shapes`: the mixture's own samples have its weights and round modes (std 1 along both
    principal axes, in mode stds); stretching one mode by 3 radially shows as major = 3, minor = 1."""
    from fdistill.evaluation.samples import mode_shapes

    g = make(num_modes=6, imbalance=5.0)  # ring of radius 2, mode std 0.2: cells far wider than 3 stds
    means, weights, std = np.asarray(g.means), np.asarray(g.weights), float(np.asarray(g.stds)[0])
    rng = np.random.default_rng(0)
    comp = rng.choice(g.num_modes, size=60000, p=weights)
    eps = rng.standard_normal((60000, 2))
    s = mode_shapes(means[comp] + std * eps, g)
    np.testing.assert_allclose(s["share"], weights, atol=0.01)
    np.testing.assert_allclose(s["major"], 1.0, atol=0.1)
    np.testing.assert_allclose(s["minor"], 1.0, atol=0.1)
    assert np.all(s["within3"] > 0.98)  # P(chi2_2 <= 9) = 0.989

    k = int(np.argmax(weights))
    u = means[k] / np.linalg.norm(means[k])  # radially: the neighbours' cells lie tangentially
    eps[comp == k] += 2.0 * (eps[comp == k] @ u)[:, None] * u[None]
    t = mode_shapes(means[comp] + std * eps, g)
    assert abs(t["major"][k] - 3.0) < 0.1 and abs(t["minor"][k] - 1.0) < 0.1
    assert t["within3"][k] < 0.8  # the stretched samples leave the 3-std disc
