"""The teacher's ODE endpoint as a regression target: knowledge distillation ('kd',
fdistill/objectives/knowledge_distill.py) and DMD's regression loss in f-distill
(`distill.lambda_reg`). Both losses are the MSE to the teacher's Heun endpoint written out by hand,
and short runs learn the teacher's map."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives, train, workdir
from fdistill.configs import ConfigError
from fdistill.configs import load as load_config
from tests.helpers import logged_rows, tiny_distill_config


def tiny_kd(num_steps=4):
    c = load_config("gmm_kd")
    c.model.width, c.model.depth, c.model.emb_dim = 32, 1, 16
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = num_steps, 64, 1, 0
    c.eval.num_steps = 4
    return c


def heun_endpoint_by_hand(gmm, z, num_steps=4):
    """EDM Algorithm 1 (Heun on the Karras grid from sigma_max = 80 to 0.002), written out in numpy."""
    n = z.shape[0]
    r = 1 / 7
    s = [(80**r + i / (num_steps - 1) * (0.002**r - 80**r)) ** 7 for i in range(num_steps)] + [0.0]
    x = 80.0 * np.asarray(z)
    for i in range(num_steps):
        d = (x - np.asarray(gmm.denoise(jnp.asarray(x), jnp.full((n,), s[i])))) / s[i]
        x_e = x + (s[i + 1] - s[i]) * d
        if s[i + 1] > 0:
            d2 = (x_e - np.asarray(gmm.denoise(jnp.asarray(x_e), jnp.full((n,), s[i + 1])))) / s[i + 1]
            x_e = x + (s[i + 1] - s[i]) * 0.5 * (d + d2)
        x = x_e
    return x


def test_loss_is_the_mse_to_the_teachers_heun_endpoint():
    obj = objectives.build(tiny_kd())
    state, frozen = obj.init(jax.random.PRNGKey(0))
    z = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
    x = heun_endpoint_by_hand(frozen["teacher"], z)
    g = np.asarray(obj.student.sample(state.params, z))
    np.testing.assert_allclose(float(obj.loss(state.params, frozen, z, None)), np.mean((g - x) ** 2), rtol=1e-4)


def tiny_regression(lambda_reg=0.5, **distill):
    c = tiny_distill_config("gmm_fdistill", lambda_reg=lambda_reg, reg_batch_size=8, **distill)
    c.eval.num_steps = 4
    return c


def regression_term(obj, state, frozen, draws, reg):
    """(generator loss with the regression draws `reg` minus without them, metrics without, metrics with)."""
    def loss(draws):
        return obj.generator_loss(state.params["gen"], state.params, frozen, draws, state.extra["ratio_bins"])

    without, (m0, _, _) = loss(draws)
    with_reg, (m1, _, _) = loss({**draws, "regression": reg})
    return float(with_reg - without), m0, m1


def test_dmd_regression_term_adds_lambda_times_the_mse_to_the_heun_endpoint():
    obj = objectives.build(tiny_regression(0.5))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    draws = {**obj.student.draws(jax.random.PRNGKey(1), 64, 0.0), "progress": 0.0,
             "critic_key": jax.random.PRNGKey(2)}
    reg = obj.regression_draws(jax.random.PRNGKey(3), frozen)
    assert reg["z"].shape == (8, 2)
    x = heun_endpoint_by_hand(frozen["teacher"], reg["z"])
    np.testing.assert_allclose(np.asarray(reg["target"]), x, rtol=1e-4, atol=1e-4)

    added, m0, m1 = regression_term(obj, state, frozen, draws, reg)
    g = np.asarray(obj.student.sample(state.params["gen"], reg["z"]))
    mse = np.mean((g - x) ** 2)
    np.testing.assert_allclose(float(m1["loss_reg"]), mse, rtol=1e-4)
    np.testing.assert_allclose(added, 0.5 * mse, rtol=1e-4)
    assert "loss_reg" not in m0


def test_regression_weight_moves_linearly_to_lambda_reg_end():
    """With distill.lambda_reg_end the term is ((1 - p) lambda_reg + p lambda_reg_end) x MSE at
    progress p; the run's length then shapes the training (train.num_steps cannot change on resume)."""
    obj = objectives.build(tiny_regression(0.5, lambda_reg_end=0.1))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    reg = obj.regression_draws(jax.random.PRNGKey(3), frozen)
    mse = np.mean((np.asarray(obj.student.sample(state.params["gen"], reg["z"])) - np.asarray(reg["target"])) ** 2)
    for p in (0.0, 0.25, 1.0):
        draws = {**obj.student.draws(jax.random.PRNGKey(1), 64, p), "progress": p, "critic_key": jax.random.PRNGKey(2)}
        added, _, metrics = regression_term(obj, state, frozen, draws, reg)
        weight = (1 - p) * 0.5 + p * 0.1
        np.testing.assert_allclose(float(metrics["lambda_reg"]), weight, rtol=1e-6)
        np.testing.assert_allclose(added, weight * mse, rtol=1e-4)
    constant = {"gen_lr_schedule": "constant"}  # nothing else that depends on the run's length
    assert "train.num_steps" in objectives.build(tiny_regression(0.5, lambda_reg_end=0.1, **constant)).trajectory_fields
    assert "train.num_steps" not in objectives.build(tiny_regression(0.5, **constant)).trajectory_fields
    # lambda_reg_end alone turns the term on (it grows from 0).
    assert objectives.build(tiny_regression(0.0, lambda_reg_end=0.2)).reg_batch == 8
    assert objectives.build(tiny_regression(0.0, lambda_reg_end=0.0)).reg_batch == 0


def test_the_regression_targets_sampler_cannot_change_on_resume():
    """Like kd's: with lambda_reg > 0 the evaluation sampler makes the training targets."""
    fields = objectives.build(tiny_regression(0.5)).trajectory_fields
    assert {"eval.num_steps", "eval.sampler"} <= set(fields)
    assert workdir.kind_of("eval.num_steps", fields) == "fixed"
    assert workdir.kind_of("eval.num_steps", objectives.build(tiny_regression(0.0)).trajectory_fields) == "evaluation"


@pytest.mark.parametrize("name,distill,match", [
    ("gmm_fdistill", {"lambda_reg": -1.0}, r"lambda_reg must be >= 0, got -1"),
    ("gmm_fdistill", {"lambda_reg": float("nan")}, r"lambda_reg must be >= 0, got nan"),
    ("gmm_fdistill", {"reg_batch_size": 0}, r"reg_batch_size must be an integer >= 1, got 0"),
    ("gmm_fdistill", {"lambda_reg_end": -0.1}, r"lambda_reg_end must be >= 0 \(or None\), got -0.1"),
    ("gmm_dmd2_multistep", {"lambda_reg": 0.0, "lambda_reg_end": 0.1},
     r"lambda_reg=0.0 \(lambda_reg_end=0.1\) needs the one-step student"),
    ("gmm_fdistill", {"gen_sigma": 10.0}, r"gen_sigma=10.0 must equal config.diffusion.sigma_max=80"),
    ("gmm_fdistill", {"latent_dim": 8}, r"needs a z of the data's shape"),
    ("gmm_dmd2_multistep", {}, r"needs the one-step student \(objective 'distill'\), not 'dmd2_multistep'"),
])
def test_regression_loss_refuses_what_it_cannot_regress(name, distill, match):
    c = tiny_distill_config(name, **{"lambda_reg": 0.5, **distill})
    with pytest.raises(ConfigError, match=match):
        objectives.build(c)


def test_short_run_learns_the_teachers_map(tmp_path):
    c = tiny_kd(300)
    c.model.width, c.model.depth = 64, 2
    c.eval.num_steps = 18  # targets from a good teacher sampler (4 Heun steps are not)
    res = train.train_and_evaluate(c, str(tmp_path), num_devices=1)
    rows = logged_rows(tmp_path, "loss")
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert res["nfe"] == 1 and res["mode_coverage"] == 1.0 and res["mode_weight_tv"] < 0.05, res


def test_short_run_with_the_regression_loss_learns_the_teachers_map(tmp_path):
    """The regression term alone is strong enough to pull the generator onto the teacher's map:
    its MSE falls during a short f-distill run."""
    c = tiny_regression(5.0)
    c.train.num_steps = 200
    c.eval.num_steps = 18
    train.train_and_evaluate(c, str(tmp_path), num_devices=1)
    rows = logged_rows(tmp_path, "loss_reg")
    first, last = np.mean([r["loss_reg"] for r in rows[:10]]), np.mean([r["loss_reg"] for r in rows[-10:]])
    assert last < 0.3 * first, (first, last)
