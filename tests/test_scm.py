"""Continuous-time consistency models (fdistill/trigflow.py, fdistill/objectives/scm.py): the boundary
condition, TrigFlow <-> EDM against the exact mixture, the jvp tangent against finite differences along the
ODE, the gradient as the dt -> 0 limit of the discrete CM loss, warmup and normalisation by hand, the loss
written out with autodiff, the samplers and the K = 1 evaluation path."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives, trigflow
from fdistill.data import gmm as gmm_lib
from fdistill.objectives import scm

from tests.helpers import tiny_distill_config

SD = 0.5


def tiny(**distill):
    c = tiny_distill_config("gmm_scm", **distill)
    c.model.out_init = "lecun"  # a non-trivial network, so that the identities below are not 0 = 0
    c.train.ema_decay = 0.0
    return c


def three_modes():
    return gmm_lib.GMM(means=jnp.array([[1.0, 0.0], [-0.5, 0.8], [0.0, -1.0]]), weights=jnp.array([0.5, 0.3, 0.2]),
                       stds=jnp.array([0.1, 0.2, 0.15]))


def exact_trig_posterior(g, x_t, t):
    """(E[x_0 | x_t], E[cos t z - sin t x_0 | x_t]) of the mixture on TrigFlow's path, in NumPy float64:
    given mode k, x_t ~ N(cos t mu_k, c_k I) with c_k = cos^2 t s_k^2 + sin^2 t SD^2 and r_k = x_t - cos t mu_k,
    E[x_0 | x_t, k] = mu_k + cos t s_k^2 r_k / c_k and E[z | x_t, k] = sin t SD^2 r_k / c_k."""
    mu, w, s = (np.asarray(a, np.float64) for a in (g.means, g.weights, g.stds))
    x, t = np.asarray(x_t, np.float64), np.asarray(t, np.float64)[:, None]
    c = np.cos(t) ** 2 * s**2 + np.sin(t) ** 2 * SD**2  # [B, K]
    r = x[:, None, :] - np.cos(t)[..., None] * mu  # [B, K, d]
    logp = np.log(w) - 0.5 * np.sum(r**2, -1) / c - np.log(2 * np.pi * c)  # d = 2
    p = np.exp(logp - logp.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    x0 = np.sum(p[..., None] * (mu + (np.cos(t) * s**2 / c)[..., None] * r), 1)
    z = np.sum(p[..., None] * ((np.sin(t) * SD**2 / c)[..., None] * r), 1)
    return x0, np.cos(t) * z - np.sin(t) * x0


@pytest.mark.parametrize("parametrisation", ["edm", "velocity", "trigflow"])
def test_boundary_condition_is_exact_and_f_is_the_networks_denoiser(parametrisation):
    c = tiny(scm_time_conditioning="trigflow" if parametrisation == "trigflow" else "edm")
    c.model.parametrisation = "velocity" if parametrisation == "velocity" else "edm"
    obj = objectives.build(c)
    net = obj.init(jax.random.PRNGKey(0))[0].params["net"]
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
    np.testing.assert_array_equal(obj.trig.f(net, x, jnp.zeros(32)), x)
    t = jax.random.uniform(jax.random.PRNGKey(2), (32,), minval=0.05, maxval=1.5)
    x_edm, sigma = trigflow.to_edm(x, t, SD)
    f = obj.trig.f(net, x, t)
    if parametrisation == "trigflow":  # the paper's conditioning: F = -net(x_t / SD; 0.1 t)
        F = -obj.trig.denoiser.net.apply({"params": net}, x / SD, 0.1 * t)
        np.testing.assert_allclose(f, np.cos(t)[:, None] * x - np.sin(t)[:, None] * SD * F, rtol=1e-5, atol=1e-6)
    else:  # f_theta(x_t, t) = D_theta(x_t / cos t; SD tan t): the EDM network seen in TrigFlow
        np.testing.assert_allclose(f, obj.trig.denoiser(net, x_edm, sigma), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(obj.trig(net, x_edm, sigma), f, rtol=1e-5, atol=1e-6)  # the samplers' EDM view
    assert float(jnp.max(jnp.abs(f - x))) > 1e-2  # away from t = 0 the network acts


def test_trigflow_edm_conversions_against_the_exact_mixture():
    g = three_modes()
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(3), 3)
    n = 256
    t = jax.random.uniform(k0, (n,), minval=0.02, maxval=1.55)
    x_t = trigflow.interpolate(g.sample(k1, n), SD * jax.random.normal(k2, (n, 2)), t)
    x0_exact, v_exact = exact_trig_posterior(g, x_t, t)
    # EDM's exact denoiser at sigma = SD tan t, x = x_t / cos t gives TrigFlow's posterior mean and velocity
    x_edm, sigma = trigflow.to_edm(x_t, t, SD)
    np.testing.assert_allclose(sigma, SD * np.tan(np.asarray(t)), rtol=1e-6)
    np.testing.assert_allclose(g.denoise(x_edm, sigma), x0_exact, rtol=1e-4, atol=1e-4)
    v = trigflow.teacher_velocity(g.denoise, x_t, t, SD)
    np.testing.assert_allclose(v, v_exact, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(trigflow.denoiser_from_velocity(v, x_t, t), x0_exact, rtol=1e-4, atol=1e-4)
    # round trips, and d/dt of the interpolant is the conditional velocity
    back, t_back = trigflow.from_edm(x_edm, sigma, SD)
    np.testing.assert_allclose(back, x_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t_back, t, rtol=1e-5)
    x0, z = g.sample(k1, n), SD * jax.random.normal(k2, (n, 2))
    _, dxdt = jax.jvp(lambda s: trigflow.interpolate(x0, z, s), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(dxdt, trigflow.target_velocity(x0, z, t), rtol=1e-5, atol=1e-6)


def rk4(v, x, t, h):
    """One RK4 step of dx/dt = v(x, t) from t to t + h (h may be negative)."""
    k1 = v(x, t)
    k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = v(x + h * k3, t + h)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


class SmoothNet(nn.Module):
    """A float64 stand-in for the MLP (which returns float32) with its call signature, for the finite
    differences below: F(x_in, c_noise), smooth in both."""

    @nn.compact
    def __call__(self, x, c_noise, **kw):
        h = jnp.concatenate([x, c_noise[:, None], jnp.sin(3 * c_noise)[:, None]], axis=-1)
        h = nn.tanh(nn.Dense(32, param_dtype=jnp.float64)(h))
        h = nn.tanh(nn.Dense(32, param_dtype=jnp.float64)(h))
        return nn.Dense(x.shape[-1], param_dtype=jnp.float64)(h)


def float64_objective(**distill):
    """(objective, state, frozen) in float64 with `SmoothNet` as its network."""
    obj = objectives.build(tiny(**distill))
    obj.trig.denoiser.net = SmoothNet()
    with jax.enable_x64(True):
        state, frozen = obj.init(jax.random.PRNGKey(0))
        return obj, jax.tree.map(lambda a: a, state), f64(frozen)


def test_tangent_is_the_derivative_of_f_along_the_ode():
    obj, state, frozen = float64_objective()
    with jax.enable_x64(True):
        net, g = f64(state.params["net"]), frozen["teacher"]
        k0, k1, k2 = jax.random.split(jax.random.PRNGKey(4), 3)
        t = jax.random.uniform(k0, (16,), jnp.float64, minval=0.1, maxval=1.5)
        x_t = trigflow.interpolate(g.sample(k1, 16), SD * jax.random.normal(k2, (16, 2), jnp.float64), t)
        v = lambda x, s: trigflow.teacher_velocity(g.denoise, x, s, SD)  # noqa: E731

        @jax.jit
        def tangents_and_differences(net, x_t, t):
            F_fn = lambda x, s: obj.trig.F(net, x, s)  # noqa: E731
            F, tang = scm.tangent(F_fn, x_t, t, v(x_t, t), SD, r=1.0)
            _, first = scm.tangent(F_fn, x_t, t, v(x_t, t), SD, r=0.0)
            h = 1e-5  # f at the ODE's points at t +- h (RK4 of the exact velocity)
            fd = (obj.trig.f(net, rk4(v, x_t, t, h), t + h) - obj.trig.f(net, rk4(v, x_t, t, -h), t - h)) / (2 * h)
            return F, tang, first, fd, F_fn(x_t, t), v(x_t, t)

        F, tang, first, fd, F_direct, vel = tangents_and_differences(net, x_t, t)
        np.testing.assert_allclose(tang / jnp.cos(t)[:, None], fd, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(F, F_direct, rtol=1e-12)
        # the warmup's r = 0 keeps only the first term, -cos^2 t (SD F - dx/dt)
        np.testing.assert_allclose(first, -(jnp.cos(t) ** 2)[:, None] * (SD * F - vel), rtol=1e-10)


def test_warmup_and_normalisation_by_hand():
    assert [float(scm.warmup(k, 100)) for k in (0, 25, 100, 250)] == [0.0, 0.25, 1.0, 1.0]
    assert float(scm.warmup(0, 0)) == 1.0
    g = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.3, -0.4]])
    np.testing.assert_allclose(scm.normalise(g, 0.1), [[3 / 5.1, 4 / 5.1], [0, 0], [0.3 / 0.6, -0.4 / 0.6]], rtol=1e-6)


def test_tangent_by_hand_with_and_without_jit():
    """F(x, t) = a x t^2: dF/dt along (v, 1) = a (v t^2 + 2 x t), so g is known in closed form."""
    a, x, v = 0.7, jnp.array([[1.0, -2.0], [0.5, 0.3]]), jnp.array([[0.2, 0.1], [-1.0, 2.0]])
    t = jnp.array([0.3, 1.2])
    c, s = np.cos(t)[:, None], np.sin(t)[:, None]
    F = a * x * (t**2)[:, None]
    expected = -c * c * (SD * F - v) - 0.4 * c * s * (x + SD * a * (v * (t**2)[:, None] + 2 * x * t[:, None]))
    fn = lambda x, v, t: scm.tangent(lambda y, u: a * y * (u**2)[:, None], x, t, v, SD, r=0.4)  # noqa: E731
    for run in (fn, jax.jit(fn)):
        F_got, g = run(x, v, t)
        np.testing.assert_allclose(F_got, F, rtol=1e-6)
        np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


def written_out_F(obj, net, x_t, t):
    """F = -F(x_t / SD; 0.1 t), the network applied directly (gmm_scm's time conditioning)."""
    return -obj.trig.denoiser.net.apply({"params": net}, x_t / SD, 0.1 * t)


@pytest.mark.parametrize("tangent,norm", [("teacher", True), ("data", True), ("teacher", False)])
def test_loss_written_out(tangent, norm):
    obj = objectives.build(tiny(scm_tangent=tangent, scm_tangent_norm=norm, scm_adaptive_weight=True))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    params = dict(state.params)
    params["weight"] = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(9), p.shape),
                                    params["weight"])  # a non-zero w(t)
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(5), 3)
    x0 = jnp.asarray(obj.batch(0)["x"][:16])
    z = SD * jax.random.normal(k1, x0.shape)
    t = obj.sample_t(k2, 16)
    r = 0.3
    net, gmm = params["net"], frozen["teacher"]
    x_t = np.cos(t)[:, None] * x0 + np.sin(t)[:, None] * z
    if tangent == "teacher":
        x0_hat = gmm.denoise(x_t / np.cos(t)[:, None], SD * np.tan(t))
        v = (np.cos(t)[:, None] * x_t - x0_hat) / np.sin(t)[:, None]
    else:
        v = np.cos(t)[:, None] * z - np.sin(t)[:, None] * x0
    one = lambda x, s: written_out_F(obj, net, x[None], s[None])[0]  # noqa: E731
    jx, jt = jax.jit(jax.vmap(jax.jacfwd(one, argnums=(0, 1))))(jnp.asarray(x_t), t)  # [B, 2, 2], [B, 2]
    dFdt = np.einsum("bij,bj->bi", jx, v) + jt
    F = np.asarray(written_out_F(obj, net, x_t, t))
    c, s = np.cos(t)[:, None], np.sin(t)[:, None]
    g = -c * c * (SD * F - v) - r * c * s * (x_t + SD * dFdt)
    if norm:
        g = g / (np.linalg.norm(g, axis=1, keepdims=True) + 0.1)
    c_noise = np.log(SD * np.tan(t)) / 4
    w = np.asarray(obj.weight_net.apply({"params": params["weight"]}, jnp.asarray(c_noise)))
    assert np.std(w) > 1e-3
    expected = np.mean(np.exp(w) * np.mean(g**2, axis=1) - w)  # F_theta - F^- = 0 in value
    loss, aux = jax.jit(obj.loss)(params, frozen, x0, z, t, r)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    np.testing.assert_allclose(float(aux["scm_sq"]), np.mean(g**2), rtol=1e-4)


def test_gradient_is_the_continuous_limit_of_the_discrete_consistency_loss():
    """Without normalisation and adaptive weight, r = 1: grad L = (2 / D) grad E[||f(x_t, t) - sg f(x_{t-dt},
    t - dt)||^2 / (2 dt SD tan t)] as dt -> 0, x_{t-dt} on the teacher's ODE (the sign and scale of the target)."""
    obj, state, frozen = float64_objective(scm_tangent_norm=False, scm_adaptive_weight=False, scm_tangent_warmup=0)
    with jax.enable_x64(True):
        params, g = f64(state.params), frozen["teacher"]
        k0, k1, k2 = jax.random.split(jax.random.PRNGKey(6), 3)
        x0 = jnp.asarray(obj.batch(0)["x"][:8], jnp.float64)
        z = SD * jax.random.normal(k1, x0.shape, jnp.float64)
        t = jax.random.uniform(k2, (8,), jnp.float64, minval=0.2, maxval=1.4)
        grad = jax.jit(jax.grad(lambda p: obj.loss(p, {"teacher": g}, x0, z, t, 1.0)[0]))(params)["net"]
        x_t = trigflow.interpolate(x0, z, t)
        v = lambda x, s: trigflow.teacher_velocity(g.denoise, x, s, SD)  # noqa: E731
        dt = 1e-6
        lo = jax.lax.stop_gradient(obj.trig.f(params["net"], rk4(v, x_t, t, -dt), t - dt))

        def discrete(net):
            d = jnp.sum((obj.trig.f(net, x_t, t) - lo) ** 2, axis=1)
            return jnp.mean(d / (2 * dt * SD * jnp.tan(t)))

        limit = jax.jit(jax.grad(discrete))(params["net"])
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grad)])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(limit)]) * 2 / 2  # 2 / D, D = 2
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_samplers_and_their_compilation():
    c = tiny()
    c.eval.chunk = 512
    obj = objectives.build(c)
    state, _ = obj.init(jax.random.PRNGKey(0))
    t0 = math.atan(80 / SD)
    np.testing.assert_allclose(scm.student_times(1, t0, 1.1), [t0])
    np.testing.assert_allclose(scm.student_times(2, t0, 1.1), [t0, 1.1])
    np.testing.assert_allclose(scm.student_times(4, t0, 1.1), [t0, 1.1, 1.1 * 2 / 3, 1.1 / 3])
    np.testing.assert_allclose(obj.evaluators[2].student.sigmas, [80.0, SD * math.tan(1.1)], rtol=1e-6)
    # one step: x = f(SD sin(t0) n, t0) = f(cos(t0) 80 n, t0)
    net = state.params["net"]
    n = jax.random.normal(jax.random.PRNGKey(7), (512, 2))
    ev = obj.evaluators[1]
    x = ev.student.sample(net, n)
    np.testing.assert_allclose(x, obj.trig.f(net, SD * math.sin(t0) * n, jnp.full((512,), t0)), rtol=1e-4, atol=1e-5)
    # it compiles once for every chunk and weights
    ev.samples(net, jax.random.PRNGKey(1), 1536)  # three chunks
    ev.samples(jax.tree.map(lambda p: p + 0.1, net), jax.random.PRNGKey(2), 512)
    assert ev._jitted["sample"]._cache_size() == 1


def test_a_short_run_learns_and_reports_every_step_count(tmp_path):
    """The loop on {net, weight} parameters; the evaluation of the configured K = 1 sampler with steps2/,
    steps4/ of the same network."""
    from fdistill import train

    c = tiny()
    c.model.width, c.model.depth = 64, 2
    c.train.num_steps, c.train.log_every = 200, 50
    c.distill.scm_tangent_warmup = 50
    res = train.train_and_evaluate(c, str(tmp_path), num_devices=1)
    assert res["nfe"] == 1 and res["steps2/nfe"] == 2 and res["steps4/nfe"] == 4 and "teacher/mmd" in res
    obj = objectives.build(c)
    state0, _ = obj.init(jax.random.PRNGKey(c.train.seed))
    x0, _ = obj.evaluators[1].samples(state0.params["net"], jax.random.PRNGKey(0), 4096)
    before = obj.source.evaluate_samples(x0)["mmd"]
    assert res["mmd"] < 0.5 * before and res["steps2/mmd"] < 0.5 * before, (before, res["mmd"], res["steps2/mmd"])


def test_bad_fields_are_clear_errors():
    with pytest.raises(ValueError, match="config.distill.scm_tangent='ode' is not known"):
        objectives.build(tiny(scm_tangent="ode"))
    with pytest.raises(ValueError, match="config.distill.scm_tangent_c=0.0 must be > 0"):
        objectives.build(tiny(scm_tangent_norm=True, scm_tangent_c=0.0))
    with pytest.raises(ValueError, match="config.distill.scm_mid_t=2.0 must be in"):
        objectives.build(tiny(scm_mid_t=2.0))
    with pytest.raises(ValueError, match="config.distill.student_sigmas='80,1': scm samples on TrigFlow times"):
        objectives.build(tiny(student_sigmas="80,1"))
    with pytest.raises(ValueError, match="latent_dim must be 0"):
        objectives.build(tiny(latent_dim=8))
    with pytest.raises(ValueError, match="config.distill.scm_time_conditioning='sigma' is not known"):
        objectives.build(tiny(scm_time_conditioning="sigma"))
    c = tiny()
    c.model.parametrisation = "velocity"
    with pytest.raises(ValueError, match="'trigflow' conditions a fresh EDM-parametrised network"):
        objectives.build(c)
