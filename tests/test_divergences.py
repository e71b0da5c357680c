"""f-divergence registry: h(r) = c f''(r) r^2 by autodiff, f(1) = 0, convexity, bad names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import divergences

R = np.array([0.05, 0.1, 0.3, 0.7, 1.0, 1.5, 3.0, 10.0, 20.0], np.float64)
ALL = [(n, {}) for n in divergences.names() if n != "alpha"] + [
    ("alpha", {"alpha": a}) for a in (-1.0, 0.0, 0.5, 1.0, 2.0, 0.3)
]

# The conventional weightings, written independently of the module (distillation notes, table 1.2).
EXPECTED_H = {
    "rkl": lambda r: np.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "sh": np.sqrt,
    "jf": lambda r: 1 + r,
    "sf": lambda r: 1 / (1 + r),
    "pearson": lambda r: r**2,
    "neyman": lambda r: 1 / r,
}


def _f2(f):
    return jax.vmap(jax.grad(jax.grad(f)))


@pytest.mark.parametrize("name,params", ALL, ids=lambda v: str(v))
def test_h_equals_f_second_derivative_times_r2(name, params):
    div = divergences.get(name, **params)
    r = jnp.asarray(R, jnp.float32)
    f2 = np.asarray(_f2(div.f)(r), np.float64)
    h = np.asarray(jax.jit(div.h)(r), np.float64)
    np.testing.assert_allclose(h, div.h_scale * f2 * R**2, rtol=2e-4, atol=1e-6)
    # f is convex and f(1) = 0
    assert np.all(f2 > 0)
    assert abs(float(div.f(jnp.float32(1.0)))) < 1e-6


@pytest.mark.parametrize("name", list(EXPECTED_H))
def test_h_matches_reference_table(name):
    h = np.asarray(divergences.get(name).h(jnp.asarray(R, jnp.float32)))
    np.testing.assert_allclose(h, EXPECTED_H[name](R), rtol=1e-5)


def test_alpha_family_special_cases():
    r = jnp.asarray(R, jnp.float32)
    np.testing.assert_allclose(divergences.get("alpha", alpha=1.0).h(r), divergences.get("kl").h(r), rtol=1e-6)
    np.testing.assert_allclose(divergences.get("alpha", alpha=0.0).h(r), divergences.get("rkl").h(r), rtol=1e-6)
    np.testing.assert_allclose(divergences.get("alpha", alpha=2.0).h(r), divergences.get("pearson").h(r), rtol=1e-5)
    np.testing.assert_allclose(divergences.get("alpha", alpha=0.5).h(r), divergences.get("sh").h(r), rtol=1e-5)


def test_f_divergence_value_forward_and_reverse_kl():
    """E_q f(p/q) gives KL(p||q) for `kl` and KL(q||p) for `rkl` (two Bernoullis, by hand)."""
    p, q = np.array([0.2, 0.8]), np.array([0.6, 0.4])
    r = jnp.asarray(p / q, jnp.float32)
    kl_pq = float(np.sum(p * np.log(p / q)))
    kl_qp = float(np.sum(q * np.log(q / p)))
    assert abs(float(jnp.sum(q * divergences.get("kl").f(r))) - kl_pq) < 1e-6
    assert abs(float(jnp.sum(q * divergences.get("rkl").f(r))) - kl_qp) < 1e-6
    js = 0.5 * np.sum(p * np.log(2 * p / (p + q))) + 0.5 * np.sum(q * np.log(2 * q / (p + q)))
    assert abs(float(jnp.sum(q * divergences.get("js").f(r))) - 2 * js) < 1e-6


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed.*rkl.*js"):
        divergences.get("kullback")
    with pytest.raises(ValueError, match="alpha"):
        divergences.get("js", alpha=0.3)
