"""Flow matching (fdistill/flow.py, objectives/flow_matching.py): the exact mixture velocity against
the exact denoiser and an autodiff score, the velocity <-> denoiser conversions, the samplers, and a
flow run as the teacher of a distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import diffusion, flow, objectives, train
from fdistill.configs import load as load_config
from fdistill.data import gmm as gmm_lib
from fdistill.denoiser import Denoiser, VelocityDenoiser, build_denoiser
from fdistill.evaluation.samples import gmm_sample_metrics

from tests.helpers import logged_rows, tiny_distill_config, tiny_score_config


def mixture():
    return gmm_lib.GMM(means=jnp.array([[1.0, 0.0], [-0.5, 0.8], [0.0, -1.0]]), weights=jnp.array([0.5, 0.3, 0.2]),
                       stds=jnp.array([0.05, 0.1, 0.2]))


def log_p_t(g, x, t):
    """log density of x_t = (1 - t) x_0 + t eps written from scratch: N((1 - t) mu_k, ((1-t)^2 s_k^2 + t^2) I)."""
    c = (1 - t) ** 2 * g.stds**2 + t**2
    sq = jnp.sum((x[None, :] - (1 - t) * g.means) ** 2, -1)
    return jax.nn.logsumexp(jnp.log(g.weights) - 0.5 * sq / c - jnp.log(2 * jnp.pi * c))


@pytest.mark.parametrize("t", [0.01, 0.3, 0.7, 0.98])
def test_exact_velocity_matches_the_denoiser_conversion_and_the_autodiff_score(t):
    g = mixture()
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 2)) * 0.8
    v = g.velocity(x, jnp.full((64,), t))
    # E[eps | x_t] = -t grad log p_t(x_t), E[x_0 | x_t] = (x_t - t E[eps | x_t]) / (1 - t)
    score = jax.vmap(jax.grad(lambda xi: log_p_t(g, xi, t)))(x)
    eps_hat = -t * score
    np.testing.assert_allclose(v, eps_hat - (x - t * eps_hat) / (1 - t), rtol=1e-4, atol=1e-4)
    sigma = t / (1 - t)
    d = g.denoise(x / (1 - t), jnp.full((64,), sigma))
    np.testing.assert_allclose(v, flow.velocity_from_denoiser(d, x, jnp.full((64,), t)), rtol=1e-4, atol=1e-4)


def test_velocity_network_converts_to_a_denoiser_and_back():
    c = tiny_score_config()
    c.model.parametrisation, c.model.out_init = "velocity", "lecun"
    den = build_denoiser(c, (2,))
    assert isinstance(den, VelocityDenoiser)
    params = den.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
    t = jnp.linspace(0.05, 0.95, 16)
    v = den.velocity(params, x, t)
    # EDM's conversion of D back to a velocity (the base class's formula) returns the network's velocity
    np.testing.assert_allclose(Denoiser.velocity(den, params, x, t), v, rtol=1e-4, atol=1e-5)
    # and D(x_sigma; sigma) = x_t - t v at x_t = x_sigma / (1 + sigma)
    sigma = t / (1 - t)
    np.testing.assert_allclose(den(params, x / (1 - t)[:, None], sigma), x - t[:, None] * v, rtol=1e-4, atol=1e-5)


def test_euler_in_t_is_euler_in_sigma():
    """DDIM equivalence: the Euler step of the flow ODE at t = sigma / (1 + sigma) is EDM's Euler step."""
    g = mixture()
    z = jax.random.normal(jax.random.PRNGKey(2), (256, 2))
    x_edm = diffusion.sample(g.denoise, z, 8, sampler="euler")
    sig = diffusion.karras_sigmas(8)
    x_flow = flow.sample(g.velocity, z * sig[0] / (1 + sig[0]), flow.sigma_to_t(sig), "euler")
    np.testing.assert_allclose(x_flow, x_edm, rtol=1e-3, atol=1e-4)


def test_many_euler_steps_on_the_exact_velocity_reproduce_the_mixture():
    g = mixture()
    z = jax.random.normal(jax.random.PRNGKey(3), (8192, 2))
    x = jax.jit(lambda z: flow.sample(g.velocity, z, flow.uniform_times(400), "euler"))(z)
    ref = np.asarray(g.sample(jax.random.PRNGKey(4), 8192))
    m = gmm_sample_metrics(np.asarray(x), g, ref)
    assert m["mode_coverage"] == 1.0 and m["mode_weight_tv"] < 0.02 and m["high_quality_frac"] > 0.93, m
    heun = jax.jit(lambda z: flow.sample(g.velocity, z, flow.uniform_times(200), "heun"))(z)
    gap = np.linalg.norm(np.asarray(heun) - np.asarray(x), axis=1)  # two solvers of one ODE agree, but for
    assert np.quantile(gap, 0.99) < 0.02, np.quantile(gap, [0.5, 0.99])  # the few paths on a watershed


def tiny_flow_config(num_steps=20):
    c = load_config("gmm_flow")
    base = tiny_score_config(num_steps)
    c.model.width, c.model.depth, c.model.emb_dim = base.model.width, base.model.depth, base.model.emb_dim
    c.train, c.eval = base.train, base.eval
    return c


def test_flow_loss_is_the_velocity_mse_written_out():
    c = tiny_flow_config()
    c.model.out_init = "lecun"
    obj = objectives.build(c)
    state, _ = obj.init(jax.random.PRNGKey(0))
    inputs = obj.noised_inputs({"x": jnp.asarray(obj.batch(0)["x"])}, jax.random.PRNGKey(1))
    x0, eps, t = (np.asarray(inputs[k]) for k in ("x0", "noise", "t"))
    assert 0 < t.min() and t.max() < 1
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = np.asarray(obj.denoiser.net.apply({"params": state.params}, jnp.asarray(x_t), jnp.asarray(t)))
    np.testing.assert_allclose(float(obj.loss(state.params, inputs)), np.mean((v - (eps - x0)) ** 2), rtol=1e-5)


def test_flow_objective_needs_a_velocity_network():
    c = tiny_flow_config()
    c.model.parametrisation = "edm"
    with pytest.raises(ValueError, match="config.model.parametrisation='edm'.*'velocity'"):
        objectives.build(c)
    c.model.parametrisation = "x0"
    with pytest.raises(ValueError, match="config.model.parametrisation='x0' is not known"):
        objectives.build(c)


def test_a_flow_run_is_a_distillation_teacher(tmp_path):
    """A short flow run, then f-distill, KD and CD with --config.distill.teacher=<its workdir>: the
    students adopt the velocity architecture and start from the teacher's weights."""
    c = tiny_flow_config(600)
    c.model.width, c.model.depth = 64, 2
    c.train.checkpoint_every, c.train.ema_decay, c.eval.num_steps = 600, 0.0, 16
    res = train.train_and_evaluate(c, str(tmp_path / "flow"), num_devices=1)
    rows = logged_rows(tmp_path / "flow", "loss")
    assert rows[-1]["loss"] < rows[0]["loss"] and res["nfe"] == 31 and res["mode_coverage"] >= 0.5, res
    for name in ("gmm_fdistill", "gmm_kd", "gmm_cd"):
        d = tiny_distill_config(name, teacher=str(tmp_path / "flow"))
        d.data = c.data  # the teacher's mixture (gmm_fdistill's is imbalanced)
        obj = objectives.build(d)
        student_net = obj.cm.denoiser if name == "gmm_cd" else obj.student.denoiser
        assert d.model.parametrisation == "velocity" and isinstance(student_net, VelocityDenoiser)
        state, frozen = obj.init(jax.random.PRNGKey(0))
        gen = state.params["gen"] if name == "gmm_fdistill" else state.params
        chex_equal = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), gen, frozen["teacher"])
        assert all(jax.tree.leaves(chex_equal))
        batch = jax.tree.map(jnp.asarray, obj.batch(0))
        state, metrics = jax.jit(obj.train_step)(state, frozen, batch)
        assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
