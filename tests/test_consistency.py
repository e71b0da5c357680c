"""Consistency distillation and training (fdistill/objectives/consistency.py): the boundary condition,
iCT's curriculum and level sampling against hand-computed values, the losses written out in NumPy,
the CD target as a hand-written Heun step of the exact teacher, and a short run."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from fdistill import diffusion, objectives, train
from fdistill.objectives import consistency as cm

from tests.helpers import logged_rows, tiny_distill_config


def tiny(name="gmm_cd", **distill):
    c = tiny_distill_config(name, **distill)
    c.model.out_init = "lecun"  # a non-trivial network, so that the identities below are not 0 = 0
    c.train.ema_decay = 0.0
    return c


@pytest.mark.parametrize("parametrisation", ["edm", "velocity"])
def test_boundary_condition_is_exact(parametrisation):
    c = tiny()
    c.model.parametrisation = parametrisation
    obj = objectives.build(c)
    state, _ = obj.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
    np.testing.assert_array_equal(obj.cm(state.params, x, jnp.full((32,), c.diffusion.sigma_min)), x)
    big = jnp.full((32,), 80.0)  # far from sigma_min, f is the denoiser (c_skip, c_out -> EDM's)
    np.testing.assert_allclose(obj.cm(state.params, x, big), obj.cm.denoiser(state.params, x, big), rtol=1e-3, atol=1e-4)
    far = obj.cm(state.params, x, jnp.full((32,), 5.0))
    assert float(jnp.max(jnp.abs(far - x))) > 1e-2  # away from sigma_min the network acts


def test_curriculum_doubles_from_s0_to_s1():
    # K = 8000, s0 = 10, s1 = 1280: K' = floor(8000 / (log2(128) + 1)) = 1000
    got = [int(cm.num_scales(k, 8000, 10, 1280)) for k in (0, 999, 1000, 2500, 6999, 7000, 7999)]
    assert got == [11, 11, 21, 41, 641, 1281, 1281]
    assert int(cm.num_scales(123, 8000, 40, 40)) == 41


def test_grid_and_level_sampling():
    n = jnp.int32(11)
    grid = cm.karras_grid(n, 21, 0.002, 80.0, 7.0)
    np.testing.assert_allclose(grid[:11], np.flip(np.asarray(diffusion.karras_sigmas(11))[:11]), rtol=1e-5)
    assert np.all(np.asarray(grid[11:]) == np.asarray(grid[10]))
    logits = cm.interval_logits(grid, n, "lognormal", -1.1, 2.0)
    p = np.asarray(jax.nn.softmax(logits))
    g = np.asarray(grid[:11], np.float64)
    cdf = norm.cdf((np.log(g) + 1.1) / 2.0)
    np.testing.assert_allclose(p[:10], np.diff(cdf) / np.diff(cdf).sum(), rtol=1e-4)
    assert np.all(p[10:] == 0)
    u = np.asarray(jax.nn.softmax(cm.interval_logits(grid, n, "uniform", 0.0, 1.0)))
    np.testing.assert_allclose(u[:10], 0.1, rtol=1e-6)


def written_out_f(obj, params, x, sigma):
    """f = c_skip x + c_out F(x / sqrt(sigma^2 + sd^2); ln(sigma) / 4) with the CM paper's c_skip, c_out."""
    sd, smin = obj.cm.sigma_data, obj.cm.sigma_min
    c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
    c_out = sd * (sigma - smin) / np.sqrt(sd**2 + sigma**2)
    f = np.asarray(obj.cm.denoiser.net.apply({"params": params}, jnp.asarray(x / np.sqrt(sigma**2 + sd**2)[:, None]),
                                             jnp.asarray(np.log(sigma) / 4)))
    return c_skip[:, None] * x + c_out[:, None] * f


@pytest.mark.parametrize("loss", ["pseudo_huber", "l2"])
def test_ct_loss_written_out(loss):
    obj = objectives.build(tiny("gmm_ct", cm_loss=loss))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    x0 = np.asarray(obj.batch(0)["x"][:16])
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(2), x0.shape))
    s_lo, s_hi = (np.asarray(v) for v in obj.pair_levels(jnp.int32(0), jax.random.PRNGKey(3), 16))
    assert np.all(s_hi > s_lo)
    pred = written_out_f(obj, state.params, x0 + s_hi[:, None] * z, s_hi)
    target = written_out_f(obj, state.params, x0 + s_lo[:, None] * z, s_lo)
    sq = np.sum((pred - target) ** 2, axis=1)
    c = 0.00054 * math.sqrt(2)
    d = np.sqrt(sq + c**2) - c if loss == "pseudo_huber" else sq / 2
    expected = np.mean(d / (s_hi - s_lo))
    got = float(obj.loss(state.params, frozen, jnp.asarray(x0), jnp.asarray(z), jnp.asarray(s_lo), jnp.asarray(s_hi)))
    np.testing.assert_allclose(got, expected, rtol=2e-4)


def test_cd_target_is_a_heun_step_of_the_teacher():
    obj = objectives.build(tiny())
    _, frozen = obj.init(jax.random.PRNGKey(0))
    gmm = frozen["teacher"]
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (16, 2))) * 2.0
    s_hi, s_lo = np.full(16, 2.0, np.float32), np.full(16, 1.5, np.float32)
    den = lambda y, s: np.asarray(gmm.denoise(jnp.asarray(y), jnp.asarray(s)))  # noqa: E731
    d1 = (x - den(x, s_hi)) / 2.0
    x_e = x - 0.5 * d1
    d2 = (x_e - den(x_e, s_lo)) / 1.5
    expected = x - 0.5 * 0.5 * (d1 + d2)
    got = obj.lower_point(gmm, None, None, jnp.asarray(x), jnp.asarray(s_lo), jnp.asarray(s_hi), {})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_fields_are_clear_errors():
    with pytest.raises(ValueError, match="config.distill.cm_loss='huber' is not known"):
        objectives.build(tiny(cm_loss="huber"))
    with pytest.raises(ValueError, match="cm_scales_min/max=\\(50, 10\\)"):
        objectives.build(tiny(cm_scales_min=50, cm_scales_max=10))
    with pytest.raises(ValueError, match="latent_dim must be 0"):
        objectives.build(tiny(latent_dim=8))


def test_short_cd_run_learns_and_reports_every_step_count(tmp_path):
    c = tiny()
    c.model.width, c.model.depth = 64, 2
    c.train.num_steps, c.train.log_every = 400, 50
    res = train.train_and_evaluate(c, str(tmp_path), num_devices=1)
    rows = logged_rows(tmp_path, "loss")
    assert np.isfinite([r["loss"] for r in rows]).all()
    assert res["nfe"] == 1 and res["steps2/nfe"] == 2 and res["steps4/nfe"] == 4 and "teacher/mmd" in res
    obj = objectives.build(c)  # the same student before training
    state0, _ = obj.init(jax.random.PRNGKey(c.train.seed))
    x0, _ = obj.evaluators[1].samples(state0.params, jax.random.PRNGKey(0), 4096)
    before = obj.source.evaluate_samples(x0)["mmd"]
    assert res["mmd"] < 0.5 * before and res["steps2/mmd"] < 0.5 * before, (before, res["mmd"], res["steps2/mmd"])


def test_the_one_step_sampler_compiles_once():
    c = tiny()
    c.eval.chunk = 512
    obj = objectives.build(c)
    state, _ = obj.init(jax.random.PRNGKey(0))
    ev = obj.evaluators[1]
    ev.samples(state.params, jax.random.PRNGKey(1), 1536)  # three chunks
    ev.samples(jax.tree.map(lambda p: p + 0.1, state.params), jax.random.PRNGKey(2), 512)  # other weights
    assert ev._jitted["sample"]._cache_size() == 1
