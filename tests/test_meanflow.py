"""MeanFlow (fdistill/objectives/meanflow.py): the identity u = v - (t - r) du/dt on a Gaussian whose
average velocity is known in closed form, the loss written out, the (r, t) draws, the samplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives
from fdistill.configs import load as load_config
from fdistill.models.mlp import FourierEmbedding
from fdistill.objectives import meanflow

from tests.helpers import tiny_score_config

MU, S = jnp.array([0.7, -0.3]), 0.4  # data N(MU, S^2 I)


def sigma_t(t):
    return jnp.sqrt((1 - t) ** 2 * S**2 + t**2)


def u_exact(z, r, t):
    """For Gaussian data the ODE trajectory through z_t is z_s = (1 - s) MU + sigma_s xi with
    xi = (z_t - (1 - t) MU) / sigma_t, so u = (z_t - z_r) / (t - r) exactly."""
    xi = (z - (1 - t)[:, None] * MU) / sigma_t(t)[:, None]
    z_r = (1 - r)[:, None] * MU + sigma_t(r)[:, None] * xi
    return (z - z_r) / (t - r)[:, None]


def v_exact(z, t):
    """dz_s/ds at s = t: -MU + sigma_t' xi, sigma_t' = (t - (1 - t) S^2) / sigma_t."""
    xi = (z - (1 - t)[:, None] * MU) / sigma_t(t)[:, None]
    return -MU + ((t - (1 - t) * S**2) / sigma_t(t))[:, None] * xi


def test_meanflow_identity_holds_for_the_exact_average_velocity():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    z = jax.random.normal(k1, (64, 2))
    t = jax.random.uniform(k2, (64,), minval=0.3, maxval=1.0)
    r = t * jax.random.uniform(k3, (64,), minval=0.0, maxval=0.9)
    u, target = meanflow.meanflow_target(u_exact, z, r, t, v_exact(z, t))
    np.testing.assert_allclose(u, u_exact(z, r, t), rtol=1e-6)
    np.testing.assert_allclose(target, u, rtol=2e-4, atol=2e-5)
    # and the limit r -> t of u is the instantaneous velocity
    np.testing.assert_allclose(u_exact(z, t - 1e-3, t), v_exact(z, t), rtol=5e-3, atol=5e-3)
    # a wrong velocity breaks the identity (the check is not vacuous)
    _, bad = meanflow.meanflow_target(u_exact, z, r, t, 1.1 * v_exact(z, t))
    assert float(jnp.max(jnp.abs(bad - u))) > 1e-2


def tiny_meanflow(**flow_fields):
    c = load_config("gmm_meanflow")
    base = tiny_score_config(20)
    c.model.width, c.model.depth, c.model.emb_dim = 32, 1, 16
    c.model.out_init = "lecun"
    c.train, c.eval = base.train, base.eval
    for k, v in flow_fields.items():
        c.flow[k] = v
    return c


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_loss_written_out(p):
    obj = objectives.build(tiny_meanflow(meanflow_p=p))
    state, _ = obj.init(jax.random.PRNGKey(0))
    x0 = jnp.asarray(obj.batch(0)["x"][:32])
    eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    r, t = meanflow.sample_times(jax.random.PRNGKey(2), 32, obj.config.flow)
    z = (1 - t)[:, None] * x0 + t[:, None] * eps
    u_fn = lambda z, r, t: obj.u(state.params, z, r, t)  # noqa: E731
    h = 1e-3  # du/dt along (v, 0, 1) by central differences
    v = eps - x0
    dudt = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    target = v - (t - r)[:, None] * dudt
    sq = np.sum((np.asarray(u_fn(z, r, t)) - np.asarray(target)) ** 2, axis=1)
    expected = np.mean(sq / (sq + 1e-3) ** p)
    loss, mean_sq = obj.loss(state.params, x0, eps, r, t)
    np.testing.assert_allclose(float(mean_sq), sq.mean(), rtol=2e-2)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-2)


def test_time_pairs():
    c = tiny_meanflow()
    r, t = meanflow.sample_times(jax.random.PRNGKey(3), 20000, c.flow)
    assert bool(jnp.all(r <= t)) and bool(jnp.all((0 < r) & (t < 1)))
    assert abs(float(jnp.mean(r < t)) - 0.25) < 0.02


def test_one_step_sampler_and_its_compilation():
    obj = objectives.build(tiny_meanflow())
    state, _ = obj.init(jax.random.PRNGKey(0))
    eps = jax.random.normal(jax.random.PRNGKey(5), (256,) + tuple(obj.source.shape))
    fn = obj.sample_fn(1)
    x = fn(state.params, eps, jnp.zeros((256,), jnp.int32))
    np.testing.assert_allclose(x, eps - obj.u(state.params, eps, jnp.zeros(256), jnp.ones(256)), rtol=1e-5, atol=1e-6)
    obj.sample(state.params, jax.random.PRNGKey(6), 768, 1)  # three chunks of 256
    assert fn._cache_size() == 1


def test_two_conditionings_get_their_own_frequencies():
    emb = FourierEmbedding(16)
    one = emb.init(jax.random.PRNGKey(0), jnp.zeros((3,)))
    two = emb.init(jax.random.PRNGKey(0), jnp.zeros((3, 2)))
    assert one["params"]["freqs"].shape == (8,) and two["params"]["freqs"].shape == (2, 8)
    out = emb.apply(two, jnp.array([[0.5, 0.0], [0.5, 0.3]]))
    assert out.shape == (2, 16) and float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-3


def test_bad_fields_are_clear_errors():
    with pytest.raises(ValueError, match="config.flow.meanflow_ratio=1.5"):
        objectives.build(tiny_meanflow(meanflow_ratio=1.5))
    c = tiny_meanflow()
    c.model.parametrisation = "edm"
    with pytest.raises(ValueError, match="set it to 'velocity'"):
        objectives.build(c)
