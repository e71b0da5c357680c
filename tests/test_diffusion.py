"""EDM identities and the deterministic samplers, checked against the exact GMM denoiser."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdistill import diffusion
from fdistill.data import gmm as gmm_lib
from fdistill.evaluation import samples as sm


def test_preconditioning_identities():
    sigma = jnp.array([0.002, 0.1, 0.5, 2.0, 80.0])
    c_skip, c_out, c_in, c_noise = diffusion.preconditioning(sigma, 0.5)
    # Unit variance of the network input and of the effective training target (EDM appendix B.6).
    np.testing.assert_allclose(c_in**2 * (0.25 + sigma**2), 1.0, rtol=1e-6)
    np.testing.assert_allclose(c_skip + c_out**2 / 0.25, 1.0, rtol=1e-5)
    np.testing.assert_allclose(c_out**2, c_skip * sigma**2, rtol=1e-5)
    np.testing.assert_allclose(c_noise, jnp.log(sigma) / 4, rtol=1e-6)
    # Zero network output: D(x) = c_skip x.
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    d = diffusion.precondition(lambda xi, cn: jnp.zeros_like(xi), x, sigma, 0.5)
    np.testing.assert_allclose(d, c_skip[:, None] * x, rtol=1e-6)
    np.testing.assert_allclose(diffusion.loss_weight(sigma, 0.5), 1 / c_out**2, rtol=1e-5)


def test_karras_grid_and_nfe():
    s = diffusion.karras_sigmas(18)
    assert s.shape == (19,)
    np.testing.assert_allclose([s[0], s[17], s[18]], [80.0, 0.002, 0.0], rtol=1e-5)
    assert np.all(np.diff(np.asarray(s)) < 0)
    assert diffusion.nfe(18, "heun") == 35 and diffusion.nfe(18, "euler") == 18


def test_lognormal_sigma_statistics():
    s = diffusion.sample_lognormal_sigma(jax.random.PRNGKey(0), (200000,), -1.2, 1.2)
    np.testing.assert_allclose([jnp.log(s).mean(), jnp.log(s).std()], [-1.2, 1.2], atol=0.02)


@pytest.fixture(scope="module")
def imbalanced_ring():
    return gmm_lib.from_config(ml_collections.ConfigDict(dict(
        layout="ring", num_modes=8, dim=2, mode_std=0.05, radius=1.0, imbalance=4.0, seed=0)))


def test_heun_with_exact_denoiser_reproduces_the_mixture(imbalanced_ring):
    g = imbalanced_ring
    noise = jax.random.normal(jax.random.PRNGKey(3), (8192, 2))
    x = jax.jit(lambda z: diffusion.sample(g.denoise, z, 18))(noise)
    assert sm.mode_coverage(x, g) == 1.0
    assert sm.mode_weight_tv(x, g) < 0.05
    assert sm.high_quality_frac(x, g) > 0.95


def test_euler_converges_to_heun_and_unknown_sampler_errors(imbalanced_ring):
    g = imbalanced_ring
    noise = jax.random.normal(jax.random.PRNGKey(4), (512, 2))
    ref = diffusion.sample(g.denoise, noise, 64, sampler="heun")
    coarse = diffusion.sample(g.denoise, noise, 16, sampler="euler")
    fine = diffusion.sample(g.denoise, noise, 256, sampler="euler")
    assert jnp.mean((fine - ref) ** 2) < jnp.mean((coarse - ref) ** 2)
    with pytest.raises(ValueError, match="sampler='ddim'.*heun.*euler"):
        diffusion.sample(g.denoise, noise, 4, sampler="ddim")


class SamplerVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sampler_jit_and_no_jit_agree(self):
        g = gmm_lib.from_config(ml_collections.ConfigDict(dict(
            layout="ring", num_modes=4, dim=2, mode_std=0.1, radius=1.0, imbalance=1.0, seed=0)))
        noise = jax.random.normal(jax.random.PRNGKey(5), (64, 2))
        out = self.variant(lambda z: diffusion.sample(g.denoise, z, 6))(noise)
        chex.assert_shape(out, (64, 2))
        chex.assert_trees_all_close(out, jax.jit(lambda z: diffusion.sample(g.denoise, z, 6))(noise), atol=1e-5)
