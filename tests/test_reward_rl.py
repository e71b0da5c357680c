"""Reward optimisation by policy gradient: FIND (initial-noise policy) and DDPO (the network as policy).

Losses against hand computations and closed forms (the clipped surrogate, advantage normalisation,
Gaussian log-densities, the ancestral transition density), FIND's closed-form optimum for a linear
reward on an identity sampler, the calibration baseline's unbiasedness, and short runs on a tiny
GMM score run (and a distilled one-step student as FIND's sampler)."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import diffusion, objectives, train
from fdistill import train_state as ts
from fdistill.data import gmm as gmm_lib
from fdistill.objectives import ddpo, find
from fdistill.objectives import policy_gradient as pg
from tests.helpers import load_config, tiny_distill_config, tiny_reference_config, tiny_score_config
from tests.named_runs import check_named_run_errors


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def test_clipped_surrogate_by_hand():
    logp = jnp.log(jnp.array([1.0, 1.5, 0.5, 1.5, 0.5, 1.1]))
    adv = jnp.array([2.0, 1.0, 1.0, -1.0, -1.0, -3.0])
    per, rho, clipped = pg.clipped_surrogate(logp, jnp.zeros(6), adv, 0.2)
    r = np.array([1.0, 1.5, 0.5, 1.5, 0.5, 1.1])
    a = np.asarray(adv)
    expected = -np.minimum(r * a, np.clip(r, 0.8, 1.2) * a)
    np.testing.assert_allclose(per, expected, rtol=1e-6)
    np.testing.assert_allclose(expected, [-2.0, -1.2, -0.5, 1.5, 0.8, 3.3], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [0, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(rho, r, rtol=1e-6)


def test_clipped_objective_is_the_plain_policy_gradient_at_ratio_one():
    """At theta = theta_old the clipped surrogate's gradient is -mean A grad log pi (REINFORCE)."""
    rng = np.random.default_rng(0)
    policy = {"mean": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
              "log_std": jnp.asarray(0.3 * rng.normal(size=(3, 2)), jnp.float32)}
    labels = jnp.asarray(rng.integers(0, 3, 64))
    z = jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=64), jnp.float32)
    logp = lambda p: pg.gaussian_log_prob(z, p["mean"][labels], p["log_std"][labels])
    old = jax.lax.stop_gradient(logp(policy))
    g_clip = jax.grad(lambda p: jnp.mean(pg.clipped_surrogate(logp(p), old, adv, 0.1)[0]))(policy)
    g_pg = jax.grad(lambda p: -jnp.mean(adv * logp(p)))(policy)
    chex.assert_trees_all_close(g_clip, g_pg, rtol=1e-5, atol=1e-7)
    # The FIND loss at ratio one (no KL) is the same.
    rows = {"z": z, "labels": labels, "logp_old": old, "valid": jnp.ones(64)}
    g_find = jax.grad(lambda p: find.policy_loss(p, rows, adv, 0.1, 0.0, 3)[0])(policy)
    chex.assert_trees_all_close(g_find, g_pg, rtol=1e-5, atol=1e-7)


def test_gaussian_log_prob_and_kl_by_hand():
    rng = np.random.default_rng(1)
    x, mean, log_std = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), 0.4 * rng.normal(size=(5, 3))
    s = np.exp(log_std)
    expected = np.sum(-0.5 * ((x - mean) / s) ** 2 - np.log(s * np.sqrt(2 * np.pi)), axis=1)
    np.testing.assert_allclose(pg.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_std)),
                               expected, rtol=1e-5)
    # KL(N(m, s^2) || N(0, 1)) by numerical integration in each dimension.
    t = np.linspace(-12, 12, 200001)
    kl = 0.0
    for m, sd in zip(mean[0], s[0]):
        p = np.exp(-0.5 * ((t - m) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
        kl += np.trapezoid(p * (np.log(p + 1e-300) + 0.5 * t**2 + 0.5 * np.log(2 * np.pi)), t)
    np.testing.assert_allclose(find.kl_to_prior(jnp.asarray(mean[:1]), jnp.asarray(log_std[:1]))[0], kl, rtol=1e-4)


def test_advantage_normalisation_by_hand():
    rng = np.random.default_rng(2)
    a = rng.normal(size=40) * 3 + 1
    labels = rng.integers(0, 4, 40)
    np.testing.assert_allclose(pg.normalize_advantages(jnp.asarray(a), jnp.asarray(labels), 4, "batch"),
                               a / (a.std() + 1e-6), rtol=1e-5)
    per_class = np.array([a[i] / (a[labels == labels[i]].std() + 1e-6) for i in range(40)])
    np.testing.assert_allclose(pg.normalize_advantages(jnp.asarray(a), jnp.asarray(labels), 4, "class"),
                               per_class, rtol=1e-5)
    np.testing.assert_allclose(pg.normalize_advantages(jnp.asarray(a), jnp.asarray(labels), 4, "none"), a, rtol=1e-6)
    np.testing.assert_allclose(pg.group_mean(jnp.asarray(a), jnp.asarray(labels), 4),
                               [a[labels == labels[i]].mean() for i in range(40)], rtol=1e-5)
    np.testing.assert_allclose(pg.group_mean(jnp.asarray(a), jnp.asarray(labels), 1), np.full(40, a.mean()), rtol=1e-5)
    w = (np.arange(40) < 25).astype(np.float32)  # rows excluded from the statistics
    np.testing.assert_allclose(pg.normalize_advantages(jnp.asarray(a), jnp.asarray(labels), 4, "batch", jnp.asarray(w)),
                               a / (a[:25].std() + 1e-6), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# FIND on an identity sampler with a linear reward (closed forms)
# ----------------------------------------------------------------------------------------------
A = np.array([0.6, -0.3], np.float32)  # r(x) = A . x


def identity_find(batch=512, lr=0.05, sample_fn=lambda p, z, lab: z, **kw):
    settings = dict(clip_eps=0.2, kl_weight=0.5, baseline="calibration", advantage_norm="none", num_rows=1)
    settings.update(kw)
    opt = ts.Optimizer(ts.OptimizerSettings(learning_rate=lr))
    optimizers = {"policy": opt, "calib": opt}
    rows = settings["num_rows"]
    state = ts.create_state(find.init_params(rows, (2,)), optimizers, jax.random.PRNGKey(0),
                            extra={"replay": find.init_replay(4, batch, (2,))})
    step = jax.jit(chex.assert_max_traces(
        lambda s, b: find.find_step(s, {"sampler": {}, "reward": {}}, b, sample_fn=sample_fn,
                                    reward_fn=lambda p, x: x @ jnp.asarray(A), optimizers=optimizers, **settings),
        n=1))
    return state, step


def test_find_reaches_the_closed_form_optimum_of_a_linear_reward():
    """max_{mu, sigma} E[A . z] - w KL(N(mu, sigma^2) || N(0, I)) has mu = A / w, sigma = 1."""
    chex.clear_trace_counter()
    state, step = identity_find()
    rng = np.random.default_rng(0)
    for i in range(600):
        batch = {"eps": jnp.asarray(rng.standard_normal((512, 2)), jnp.float32), "labels": jnp.zeros(512, jnp.int32)}
        state, m = step(state, batch)
    p = state.params["policy"]
    np.testing.assert_allclose(p["mean"][0], A / 0.5, atol=0.1)
    np.testing.assert_allclose(np.exp(p["log_std"][0]), [1.0, 1.0], atol=0.1)
    # The calibration tracks the expected reward of the current distribution, A . mu.
    np.testing.assert_allclose(state.params["calib"]["value"][0], float(A @ (A / 0.5)), atol=0.1)
    assert int(state.step) == 600 and float(state.extra["replay"]["valid"].sum()) == 4 * 512
    chex.clear_trace_counter()


def test_find_learns_one_distribution_per_class():
    """A class-conditional sampler x = (1 - 2c) z: the reward A . x favours +A for class 0 and -A for
    class 1, so the optima are mu_0 = A / w and mu_1 = -A / w; the calibration learns A . x per class
    and the per-class advantage normalisation runs."""
    chex.clear_trace_counter()
    flip = lambda p, z, lab: z * (1.0 - 2.0 * lab[:, None].astype(z.dtype))
    state, step = identity_find(sample_fn=flip, num_rows=2, advantage_norm="class", lr=0.03)
    rng = np.random.default_rng(1)
    for i in range(800):
        batch = {"eps": jnp.asarray(rng.standard_normal((512, 2)), jnp.float32),
                 "labels": jnp.asarray(rng.integers(0, 2, 512), jnp.int32)}
        state, m = step(state, batch)
    p = state.params["policy"]
    # With normalised advantages the fixed point moves (the KL term is weighed against A / std(A));
    # the direction and the sign per class are what the per-class table must get right.
    for c, sign in ((0, 1.0), (1, -1.0)):
        mu = np.asarray(p["mean"][c])
        cos = float(mu @ (sign * A) / (np.linalg.norm(mu) * np.linalg.norm(A)))
        assert cos > 0.99 and np.linalg.norm(mu) > 0.5, (c, mu)
    chex.clear_trace_counter()


def test_calibration_baseline_leaves_the_gradient_unbiased():
    """On one fixed batch the policy gradients with and without the baseline differ by b mean(grad log pi),
    which is zero in expectation: within 4 standard errors of each other and of the exact gradient
    d/d mu E[A . z] = A, d/d log sigma = 0."""
    n = 20000
    rng = np.random.default_rng(3)
    mean, log_std = jnp.asarray([[0.5, -0.2]]), jnp.asarray([[0.1, -0.3]])
    policy = {"mean": mean, "log_std": log_std}
    z = mean + jnp.exp(log_std) * jnp.asarray(rng.standard_normal((n, 2)), jnp.float32)
    labels = jnp.zeros(n, jnp.int32)
    r = z @ jnp.asarray(A)
    logp_old = pg.gaussian_log_prob(z, mean[labels], log_std[labels])
    rows = {"z": z, "labels": labels, "logp_old": logp_old, "valid": jnp.ones(n)}
    b = float(A @ np.asarray(mean[0]))  # the calibrated expected reward
    grad = lambda adv: jax.grad(lambda p: find.policy_loss(p, rows, adv, 0.2, 0.0, 1)[0])(policy)
    g_plain, g_base = grad(r), grad(r - b)
    # Per-sample score function of the Gaussian (the rows' contributions), for the standard errors.
    s = np.exp(np.asarray(log_std[0]))
    u = (np.asarray(z) - np.asarray(mean[0])) / s
    score = np.concatenate([u / s, u**2 - 1], axis=1)  # d log pi / d mu, d log pi / d log sigma
    se_diff = b * score.std(0) / np.sqrt(n)
    se_plain = (np.asarray(r)[:, None] * score).std(0) / np.sqrt(n)
    flat = lambda g: -np.concatenate([np.asarray(g["mean"][0]), np.asarray(g["log_std"][0])])
    diff = flat(g_plain) - flat(g_base)
    np.testing.assert_allclose(diff, b * score.mean(0), atol=1e-5)  # exactly b mean(score), up to float32 rounding
    assert np.all(np.abs(diff) < 4 * se_diff + 1e-8), (diff, se_diff)
    exact = np.concatenate([A, [0.0, 0.0]])
    assert np.all(np.abs(flat(g_base) - exact) < 4 * se_plain), (flat(g_base), exact, se_plain)
    assert np.all(np.abs(flat(g_plain) - exact) < 4 * se_plain), (flat(g_plain), exact, se_plain)


# ----------------------------------------------------------------------------------------------
# DDPO's stochastic sampler
# ----------------------------------------------------------------------------------------------
def test_ddpo_transition_log_prob_is_the_gaussian_density_by_hand():
    from scipy.stats import multivariate_normal

    cfg = tiny_score_config()
    gmm = gmm_lib.from_config(cfg.data)
    policy = ddpo.AncestralSampler(lambda p, x, s: p.denoise(x, s), 5, cfg.diffusion, 1.0, 0)
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(8, 4, 2)), jnp.float32)
    states, x = policy.rollout(gmm, z, noise, None)
    logp = np.asarray(policy.log_probs(gmm, states, None))
    s = np.asarray(diffusion.karras_sigmas(5, 0.002, 80.0, 7.0), np.float64)
    for i in range(4):
        xi = np.asarray(states[i], np.float64)
        d = np.asarray(gmm.denoise(states[i], jnp.full((8,), s[i])), np.float64)
        var = s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2  # DDPM posterior variance of VE noising
        mean = d + (s[i + 1] ** 2 / s[i]) / s[i] * (xi - d)  # x0 + (s'^2 / s^2)(x - x0)
        expected = [multivariate_normal(mean[b], var * np.eye(2)).logpdf(np.asarray(states[i + 1][b], np.float64))
                    for b in range(8)]
        np.testing.assert_allclose(logp[i], expected, rtol=2e-4, atol=2e-3)
    # The last step is deterministic: x_K = D(x_{K-1}; s_{K-1}).
    np.testing.assert_allclose(x, gmm.denoise(states[-1], jnp.full((8,), s[4])), rtol=1e-6)


def test_ancestral_sampler_with_the_exact_denoiser_samples_the_mixture():
    cfg = tiny_score_config()
    source_cfg = cfg.data
    gmm = gmm_lib.from_config(source_cfg)
    policy = ddpo.AncestralSampler(lambda p, x, s: p.denoise(x, s), 100, cfg.diffusion, 1.0, 0)
    key = jax.random.PRNGKey(0)
    z = jax.random.normal(key, (4096, 2))
    noise = jax.random.normal(jax.random.fold_in(key, 1), (4096, 99, 2))
    x = np.asarray(jax.jit(lambda z, n: policy.sample(gmm, z, n, None))(z, noise))
    from fdistill.evaluation import samples

    assert samples.high_quality_frac(x, gmm) > 0.95 and samples.mode_coverage(x, gmm) == 1.0
    # eta -> 0: the transition mean is DDIM's, i.e. an Euler step of the probability-flow ODE.
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)) * 3, jnp.float32)
    d = gmm.denoise(xs, jnp.full((16,), 3.0))
    euler = diffusion.euler_step(lambda x, s: gmm.denoise(x, s), xs, jnp.full((16,), 3.0), jnp.full((16,), 1.5))[0]
    np.testing.assert_allclose(ddpo.transition_mean(d, xs, 3.0, 1.5, 0.0), euler, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The objectives on a tiny trained score run and a tiny distilled student
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tiny finished one-step f-distill run (exact mixture teacher, wide latent)."""
    wd = str(tmp_path_factory.mktemp("student"))
    c = tiny_distill_config()
    c.model = tiny_reference_config().model
    c.data = load_config("gmm_find").data  # the balanced ring of the reward configs
    c.distill.latent_dim = 4
    c.train.num_steps = 40
    c.train.checkpoint_every = 40
    train.train_and_evaluate(c, wd)
    return wd


def rl_config(sampler, method="find", steps=10, lr=None, **rl):
    c = load_config(f"gmm_{method}")
    c.rl.sampler = sampler
    c.model = tiny_reference_config().model
    c.rl.sampler_steps = 4
    c.rl.ddpo_steps = 8
    for k, v in rl.items():
        c.rl[k] = v
    c.train.num_steps = steps
    if lr is not None:
        c.train.learning_rate = lr
    c.train.batch_size = 128
    c.train.log_every = 1
    c.train.checkpoint_every = steps
    c.eval.num_samples = c.eval.chunk = 1024
    return c


def test_bad_config_values_name_the_field(score_run_dir, student_dir):
    for method, field, value, match in (
            ("find", "baseline", "critic", r"config.rl.baseline='critic' is not known; allowed: \['calibration'"),
            ("find", "advantage_norm", "rank", r"config.rl.advantage_norm='rank' is not known; allowed: \['batch'"),
            ("find", "clip_eps", 1.5, r"config.rl.clip_eps must be in \(0, 1\)"),
            ("find", "replay", 0, r"config.rl.replay must be >= 1"),
            ("find", "kl_weight", -1.0, r"config.rl.kl_weight must be >= 0"),
            ("ddpo", "ddpo_eta", 0.0, r"config.rl.ddpo_eta must be > 0"),
            ("ddpo", "ddpo_steps", 1, r"config.rl.ddpo_steps must be >= 2"),
            ("ddpo", "inner_updates", 0, r"config.rl.inner_updates must be >= 1")):
        c = rl_config(score_run_dir, method)
        c.rl[field] = value
        with pytest.raises(ValueError, match=match):
            objectives.build(c)
    with pytest.raises(ValueError, match=r"holds a 'distill' run; DDPO fine-tunes a diffusion network"):
        objectives.build(rl_config(student_dir, "ddpo"))


def test_sampler_is_a_named_finished_run(tmp_path):
    check_named_run_errors(lambda wd: objectives.build(rl_config(wd)), "rl.sampler", "gmm_score",
                           tiny_reference_config(), tmp_path)


def test_find_run_raises_the_reward_and_reports_the_alignment_metrics(score_run_dir, tmp_path):
    res = train.train_and_evaluate(rl_config(score_run_dir, steps=60), str(tmp_path))
    for k in ("reward_mean", "preferred_frac", "preferred_on_data_frac", "mmd_to_reference", "kl_to_prior",
              "reward_evals", "sample/mode_coverage", "sample/high_quality_frac", "reference/reward_mean",
              "reference/preferred_frac", "reference/preferred_on_data_frac"):
        assert k in res, k
    assert res["reward_mean"] > res["reference/reward_mean"] + 0.2, res
    assert res["preferred_frac"] > res["reference/preferred_frac"] + 0.1, res
    assert res["kl_to_prior"] > 0 and res["mmd_to_reference"] > 0
    assert res["reward_evals"] == 60 * 128 and res["sampler_nfe"] == 7
    assert os.listdir(os.path.join(str(tmp_path), "plots"))


def test_find_on_a_one_step_student(student_dir, tmp_path):
    """A distilled generator as the frozen sampler: each reward evaluation is one network call, and
    the policy lives in the student's 4-dimensional latent space."""
    obj = objectives.build(rl_config(student_dir))
    assert obj.sampler.nfe == 1 and obj.latent_shape == (4,)
    res = train.train_and_evaluate(rl_config(student_dir, steps=60), str(tmp_path))
    assert res["sampler_nfe"] == 1
    # The 40-update student is crude (its samples already lie mostly in the preferred half-plane):
    # FIND still moves them further along the reward.
    assert res["reward_mean"] > res["reference/reward_mean"] + 0.03, res


def test_ddpo_step_compiles_once_and_a_short_run_raises_the_reward(score_run_dir, tmp_path):
    c = rl_config(score_run_dir, "ddpo", steps=30, lr=1e-4)
    obj = objectives.build(c)
    assert obj.optimizer.settings.num_steps == 30 * c.rl.inner_updates  # the schedule counts rounds
    state, frozen = obj.init(jax.random.PRNGKey(0))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(obj.train_step, n=1))
    for i in range(3):
        state, m = step(state, frozen, jax.tree.map(jnp.asarray, obj.batch(i)))
    # The first inner update is at ratio 1: nothing clipped, the plain policy gradient.
    assert np.isfinite(float(m["loss"])) and int(state.step) == 3
    chex.clear_trace_counter()
    res = train.train_and_evaluate(c, str(tmp_path))
    assert res["reward_mean"] > res["reference/reward_mean"] + 0.1, res
    assert res["reward_evals"] == 30 * 128


def test_a_resumed_find_run_follows_the_uninterrupted_one(score_run_dir, tmp_path):
    """The replay of past batches is train state: it is checkpointed, so stopping at step 6 and
    resuming gives the uninterrupted run's losses."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(rl_config(score_run_dir, steps=12), straight)
    c = rl_config(score_run_dir, steps=6)
    train.train_and_evaluate(c, resumed)
    train.train_and_evaluate(rl_config(score_run_dir, steps=12), resumed)
    rows = lambda wd: {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))
                       if "loss" in r}
    a, b = rows(straight), rows(resumed)
    assert sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in range(7, 13)], [a[s] for s in range(7, 13)], rtol=1e-5)


def test_find_one_and_eight_devices_agree(score_run_dir, tmp_path):
    rows = {}
    for n in (1, 8):
        wd = str(tmp_path / str(n))
        train.train_and_evaluate(rl_config(score_run_dir, steps=5), wd, num_devices=n)
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            rows[n] = [(r["reward"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
    assert len(rows[1]) == 5
    np.testing.assert_allclose(rows[1], rows[8], rtol=1e-4, atol=1e-6)


def test_table_speed_to_a_reward_level_by_hand(tmp_path):
    """The table's speed measure: reward evaluations = step x batch and seconds summed over the logged
    intervals (steps / steps_per_sec), at the first logged step whose batch reward reaches the level."""
    from experiments.tables.common import time_to_level, training_curve

    rows = [{"step": 5, "reward": 0.1, "loss": 1.0, "steps_per_sec": 10.0},
            {"step": 10, "reward": 0.4, "loss": 1.0, "steps_per_sec": 5.0},
            {"step": 10, "sample/mmd": 0.3},  # an evaluation row: not part of the curve
            {"step": 15, "reward": 0.7, "loss": 1.0, "steps_per_sec": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = training_curve(str(tmp_path), batch=256)
    np.testing.assert_allclose(curve[0], [1280, 2560, 3840])
    np.testing.assert_allclose(curve[1], [0.5, 1.5, 3.5])
    assert time_to_level(curve, 0.4) == (2560.0, 1.5)  # the level: reference + gain
    assert time_to_level(curve, 0.5) == (3840.0, 3.5)
    assert all(np.isnan(time_to_level(curve, 0.9)))
