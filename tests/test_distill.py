"""f-distill and its pieces: loss pieces against hand-written versions, the teacher, critic and
one-step student alone, the reverse-KL gradient on a 1-D example by hand, density-ratio recovery,
compile-once, 1 vs 8 devices, and a short distillation."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdistill import divergences, objectives, sharding
from fdistill.configs import load as load_config
from fdistill.data.gmm import GMM
from fdistill.evaluation import ratio as ratio_lib
from tests.helpers import logged_rows, tiny_distill_config
from fdistill.distillation import losses, teachers


def tiny_config(divergence="js", **distill_kw):
    """gmm_fdistill with a small network and batch: a step in milliseconds."""
    c = tiny_distill_config("gmm_fdistill", divergence=divergence, **distill_kw)
    c.train.num_steps = 4
    return c


# ----- pure pieces ------------------------------------------------------------------------------


def test_ratio_and_bin_normalisation_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, 64).astype(np.float32)
    r = np.asarray(losses.ratio_from_logits(jnp.asarray(logits), 3.0, 0.1, 20.0))
    np.testing.assert_allclose(r, np.clip(np.exp(np.clip(logits, -3, 3)), 0.1, 20.0), rtol=1e-6)

    idx = rng.integers(0, 4, 64)
    idx[idx == 2] = 1  # bin 2 empty: keeps its old value
    old = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    for ema in (0.0, 0.5):
        r_n, bins = losses.bin_normalize(jnp.asarray(r), jnp.asarray(idx), jnp.asarray(old), ema)
        expect_bins = old.copy()
        for b in (0, 1, 3):
            expect_bins[b] = ema * old[b] + (1 - ema) * r[idx == b].mean()
        np.testing.assert_allclose(np.asarray(bins), expect_bins, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(r_n), r / (expect_bins[idx] + 1e-6), rtol=1e-5)


def test_normalized_h_and_rkl_is_exactly_one():
    r = jnp.asarray(np.random.default_rng(1).uniform(0.1, 20, 128), jnp.float32)
    assert np.all(np.asarray(losses.normalized_h(divergences.get("rkl"), r)) == 1.0)
    h = np.asarray(losses.normalized_h(divergences.get("kl"), r))
    np.testing.assert_allclose(h, np.asarray(r) / np.asarray(r).mean(), rtol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_dm_loss_gradient_is_weighted_score_difference(use_jit):
    rng = np.random.default_rng(2)
    x, d_real, d_fake = (jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) for _ in range(3))
    h = jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32)
    w = losses.teacher_error_weight(x, d_real)
    np.testing.assert_allclose(np.asarray(w), 1 / (np.abs(np.asarray(x - d_real)).mean(1) + 1e-6), rtol=1e-5)
    fn = jax.grad(losses.dm_loss)
    fn = jax.jit(fn) if use_jit else fn
    grad = np.asarray(fn(x, d_real, d_fake, h, w))
    expect = (np.asarray(d_fake - d_real) * np.asarray(w * h)[:, None]) / x.size
    np.testing.assert_allclose(grad, expect, rtol=1e-5, atol=1e-7)


def test_disc_and_gan_losses_by_hand():
    lr, lf = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0])
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    expect = np.mean(sp(-np.array([2.0, -1.0]))) + np.mean(sp(np.array([0.5, -3.0])))
    np.testing.assert_allclose(float(losses.disc_loss(lr, lf)), expect, rtol=1e-6)
    np.testing.assert_allclose(float(losses.gan_generator_loss(lf)), np.mean(sp(-np.array([0.5, -3.0]))), rtol=1e-6)


# ----- the generator update -------------------------------------------------------------------


def test_rkl_without_gan_is_exactly_the_dmd_update():
    """VSD/DMD (arXiv 2311.18828): grad = ((x - D_real) - (x - D_fake)) / mean|x - D_real|,
    loss 0.5 * mse(x, sg(x - grad)), written here independently and replayed on the same draws."""
    c = tiny_config("rkl", lambda_gan=0.0)
    obj = objectives.build(c)
    assert not obj.use_disc
    state, frozen = obj.init(jax.random.PRNGKey(0))
    draws = obj.student.draws(jax.random.PRNGKey(3), 64)
    grads, (aux, _, pieces) = jax.jit(jax.grad(obj.generator_loss, has_aux=True))(
        state.params["gen"], state.params, frozen, draws, state.extra["ratio_bins"])

    def dmd_loss(gen_params):
        x = obj.student.denoiser(gen_params, 80.0 * draws["z"], jnp.full((64,), 80.0))  # G(z), written out
        sigma = obj.levels.grid[draws["index"]]
        xt = x + sigma[:, None] * draws["eps"]
        d_real = frozen["teacher"].denoise(xt, sigma)
        d_fake = obj.student.denoiser(state.params["fake"], xt, sigma)
        grad = ((x - d_real) - (x - d_fake)) / (jnp.mean(jnp.abs(x - d_real), axis=1, keepdims=True) + 1e-6)
        return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - grad)) ** 2)

    expect = jax.jit(jax.grad(dmd_loss))(state.params["gen"])
    chex.assert_trees_all_close(grads, expect, rtol=1e-5, atol=1e-7)  # float32 sums of cancelling terms
    assert float(aux["h/min"]) == float(aux["h/max"]) == 1.0


def test_rkl_weighting_is_one_with_a_discriminator():
    """With the discriminator present (GAN term on), rkl still weights every sample by exactly 1."""
    c = tiny_config("rkl", lambda_gan=1e-3)
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    _, (aux, _, pieces) = jax.jit(obj.generator_loss)(state.params["gen"], state.params, frozen,
                                                      obj.student.draws(jax.random.PRNGKey(1), 64),
                                                      state.extra["ratio_bins"])
    assert np.all(np.asarray(pieces["h"]) == 1.0)


def test_generator_update_follows_the_reverse_kl_gradient_1d():
    """p = N(0, 1), student x = theta + s z, noise sigma. With the exact teacher denoiser and the exact
    fake denoiser of the noised batch mixture, the generator loss gradient (w = h = 1) equals
    sigma^2 d/d(theta, s) KL(N(theta, s^2 + sigma^2) || N(0, 1 + sigma^2)), computed by hand:
    dKL/dtheta = theta / b, dKL/ds = s / b - s / (s^2 + sigma^2), b = 1 + sigma^2."""
    gmm = GMM(means=jnp.zeros((1, 1)), weights=jnp.ones(1), stds=jnp.ones(1))
    theta, s = 0.7, 0.5
    n = 4000
    z = jax.random.normal(jax.random.PRNGKey(0), (n, 1))
    eps = jax.random.normal(jax.random.PRNGKey(1), (n, 1))
    for sigma in (0.5, 1.0, 2.0):
        def loss(params):
            x = params[0] + params[1] * z
            xt = x + sigma * eps
            sig = jnp.full((n,), sigma)
            d_real = gmm.denoise(xt, sig)
            xb = jax.lax.stop_gradient(x)[:, 0]  # the batch mixture (1/n) sum_i N(x_i, sigma^2)
            logits = -0.5 * (xt - xb[None, :]) ** 2 / sigma**2
            d_fake = jnp.sum(jax.nn.softmax(logits, axis=1) * xb[None, :], axis=1, keepdims=True)
            one = jnp.ones((n,))
            return losses.dm_loss(x, d_real, d_fake, one, one) * x.size / n  # mean over examples

        g = np.asarray(jax.jit(jax.grad(loss))(jnp.array([theta, s])))
        b = 1 + sigma**2
        exact = sigma**2 * np.array([theta / b, s / b - s / (s**2 + sigma**2)])
        np.testing.assert_allclose(g, exact, atol=0.06 * sigma**2 * np.abs(exact).max() + 0.01)
        assert np.dot(g, exact) / (np.linalg.norm(g) * np.linalg.norm(exact)) > 0.98


def test_discriminator_recovers_log_ratio_of_two_gaussians():
    """The logistic loss on noised samples of two known Gaussians: logit ~ log p_sigma / q_sigma."""
    c = tiny_config("js", disc_on="separate", disc_hidden=64)
    c.model.width = 64
    c.model.depth = 2
    obj = objectives.build(c)
    state, _ = obj.init(jax.random.PRNGKey(0))
    p = GMM(means=jnp.zeros((1, 2)), weights=jnp.ones(1), stds=jnp.ones(1))
    q = GMM(means=jnp.array([[1.5, 0.0]]), weights=jnp.ones(1), stds=jnp.array([0.5]))
    lo, hi = 0, 700  # sigma up to ~2.2: beyond that the two marginals are indistinguishable
    critic = obj.critic
    tx = optax.adam(3e-3)
    opt = tx.init(state.params["disc"])
    grid = obj.levels.grid

    def sample(key, b):
        k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
        sr = grid[jax.random.randint(k1, (b,), lo, hi)]
        sf = grid[jax.random.randint(k2, (b,), lo, hi)]
        yr = p.sample(k3, b) + sr[:, None] * jax.random.normal(k4, (b, 2))
        yf = q.sample(k5, b) + sf[:, None] * jax.random.normal(k6, (b, 2))
        return yr, sr, yf, sf

    @jax.jit
    def step(disc, opt, key):
        yr, sr, yf, sf = sample(key, 256)

        def loss(d):
            params = {**state.params, "disc": d}
            return losses.disc_loss(critic.logits(params, None, yr, sr)[0], critic.logits(params, None, yf, sf)[0])

        g = jax.grad(loss)(disc)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(disc, u), opt

    disc = state.params["disc"]
    for i in range(400):
        disc, opt = step(disc, opt, jax.random.PRNGKey(100 + i))
    yr, sr, yf, sf = sample(jax.random.PRNGKey(7), 1000)
    y, s = jnp.concatenate([yr, yf]), jnp.concatenate([sr, sf])
    logit = np.asarray(critic.logits({**state.params, "disc": disc}, None, y, s)[0])
    exact = np.asarray(p.log_prob(y, s) - q.log_prob(y, s))
    keep = np.abs(exact) < 15  # the logit is only used through clip(exp(logit), 0.1, 20)
    corr = np.corrcoef(logit[keep], exact[keep])[0, 1]
    assert corr > 0.9, corr


def test_exact_log_ratio_against_closed_form():
    """The batch mixture of many samples of N(mu, s^2) noised by sigma tends to N(mu, s^2 + sigma^2)."""
    gmm = GMM(means=jnp.zeros((1, 2)), weights=jnp.ones(1), stds=jnp.ones(1))
    q = GMM(means=jnp.array([[1.0, 0.0]]), weights=jnp.ones(1), stds=jnp.array([0.3]))
    batch = q.sample(jax.random.PRNGKey(0), 4096)
    y = jax.random.normal(jax.random.PRNGKey(1), (200, 2)) * 0.8 + jnp.array([0.5, 0.0])
    got = np.asarray(ratio_lib.exact_log_ratio(gmm, batch, y, 1.0))
    expect = np.asarray(gmm.log_prob(y, 1.0) - q.log_prob(y, 1.0))
    np.testing.assert_allclose(got, expect, atol=0.05)
    assert abs(ratio_lib.spearman([1, 2, 3, 4], [10, 20, 25, 100]) - 1.0) < 1e-12
    assert abs(ratio_lib.spearman([1, 2, 3, 4], [4, 3, 2, 1]) + 1.0) < 1e-12


def test_fused_critic_pass_equals_separate_calls():
    """disc_on='fake_score' runs the fake network once over [DSM; fake; real] rows: the same losses as
    the EDM DSM loss (`denoiser.edm_dsm_loss`) and two separate discriminator calls on the same draws."""
    from fdistill.denoiser import edm_dsm_loss

    obj = objectives.build(tiny_config("js"))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    params, critic, b = state.params, obj.critic, 64
    x_real = jnp.asarray(obj.batch(0)["x"][:, 0])
    point = obj.student.train_point(params["gen"], obj.student.draws(jax.random.PRNGKey(4), b))
    key = jax.random.PRNGKey(5)
    loss, aux = jax.jit(critic.loss)(params, frozen["teacher"], point, x_real, jnp.zeros(b, jnp.int32), key)

    k_fake, k_ir, k_er = jax.random.split(key, 3)
    k_s, k_n = jax.random.split(k_fake)
    x_fake = point["x"]
    sigma_f = obj.levels.grid[jax.random.randint(k_s, (b,), 0, 1000)]  # uniform over the whole grid
    l_fake = jnp.mean(edm_dsm_loss(critic.denoiser, params["fake"], x_fake, sigma_f,
                                   jax.random.normal(k_n, x_fake.shape)))
    s_r = obj.levels.grid[obj.levels.draw_index(k_ir, b)]
    lf = critic.logits(params, None, x_fake + point["sigma"][:, None] * point["noise"], point["sigma"])[0]
    lr = critic.logits(params, None, x_real + s_r[:, None] * jax.random.normal(k_er, x_real.shape), s_r)[0]
    np.testing.assert_allclose(float(aux["loss_fake"]), float(l_fake), rtol=1e-4)
    np.testing.assert_allclose(float(aux["loss_disc"]), float(losses.disc_loss(lr, lf)), rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(l_fake + losses.disc_loss(lr, lf)), rtol=1e-4)


# ----- the compiled step --------------------------------------------------------------------------


def _mesh_step(obj, state, frozen, batch, n_devices, step_fn=None):
    mesh = sharding.make_mesh(n_devices)
    repl = sharding.replicated(mesh)
    fn = jax.jit(step_fn or obj.train_step, in_shardings=(repl, repl, sharding.batch_sharding(mesh)),
                 out_shardings=(repl, repl))
    state, frozen = sharding.replicate(state, mesh), sharding.replicate(frozen, mesh)
    out = []
    for step in range(2):
        state, metrics = fn(state, frozen, sharding.shard_batch(batch(step), mesh))
        out.append(sharding.to_host(metrics))
    return sharding.to_host(state), out


def test_step_compiles_once_devices_agree_and_loops_agree():
    """One compiled step on a 1-device and an 8-device mesh (state replicated, batch sharded) gives the
    same losses and parameters; the Python-unrolled critic loop gives the same as `lax.scan`."""
    obj = objectives.build(tiny_config("js", disc_on="fake_score", critic_loop="scan"))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    chex.clear_trace_counter()
    s8, m8 = _mesh_step(obj, state, frozen, obj.batch, 8, chex.assert_max_traces(obj.train_step, n=1))
    s1, m1 = _mesh_step(obj, state, frozen, obj.batch, 1)
    for a, b in zip(m1, m8):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
    chex.assert_trees_all_close(s1.params, s8.params, rtol=2e-4, atol=2e-5)
    assert int(s1.step) == 2
    for k in ("loss", "loss_dm", "loss_gan", "loss_fake", "loss_disc", "h/min", "h/mean", "h/max"):
        assert np.isfinite(m1[-1][k]), k
    assert abs(m1[-1]["h/mean"] - 1.0) < 1e-4

    unrolled = objectives.build(tiny_config("js", disc_on="fake_score", critic_loop="unroll"))
    step = jax.jit(unrolled.train_step)
    s = state
    for i in range(2):
        s, m = step(s, frozen, unrolled.batch(i))
    chex.assert_trees_all_close(sharding.to_host(s.params), s1.params, rtol=2e-4, atol=2e-5)


def test_separate_discriminator_step():
    """disc_on='separate': the discriminator has its own trunk; one step updates it."""
    obj = objectives.build(tiny_config("kl", disc_on="separate", fake_updates_per_gen=1))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    assert set(state.params["disc"]) == {"trunk", "head"}
    new, metrics = jax.jit(obj.train_step)(state, frozen, obj.batch(0))
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss_disc"]))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params["disc"]["trunk"],
                         state.params["disc"]["trunk"])
    assert max(jax.tree.leaves(moved)) > 0


# ----- configs and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("name,div,gan", [("gmm_fdistill", "js", True), ("gmm_dmd2", "rkl", True),
                                          ("gmm_vsd", "rkl", False)])
def test_named_method_configs(name, div, gan):
    c = load_config(name)
    assert c.objective == "distill" and c.distill.divergence == div
    assert (c.distill.lambda_gan > 0) == gan
    obj = objectives.build(c)
    assert obj.use_disc == gan or div != "rkl"
    assert obj.student.num_steps == 1 and obj.name == "distill"


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="config.distill.divergence.*allowed"):
        objectives.build(tiny_config("kullback"))
    with pytest.raises(ValueError, match="config.distill.disc_on.*allowed"):
        objectives.build(tiny_config(disc_on="trunk"))
    with pytest.raises(ValueError, match="disc_on='teacher' needs a network teacher"):
        objectives.build(tiny_config(disc_on="teacher"))
    with pytest.raises(ValueError, match="config.distill.ratio_binning"):
        objectives.build(tiny_config(ratio_binning="log"))
    with pytest.raises(ValueError, match="config.distill.fake_loss"):
        objectives.build(tiny_config(fake_loss="l1"))
    with pytest.raises(ValueError, match="num_student_steps=2 needs a few-step objective"):
        objectives.build(tiny_config(num_student_steps=2))
    with pytest.raises(ValueError, match="config.distill.critic_loop"):
        objectives.build(tiny_config(critic_loop="while"))
    with pytest.raises(ValueError, match="config.distill.teacher"):
        objectives.build(tiny_config(teacher="/nonexistent/run"))
    c = tiny_config()
    c.data.name = "digits"
    with pytest.raises(ValueError, match="teacher='analytic' needs config.data.name='gmm'"):
        objectives.build(c)


# ----- training ---------------------------------------------------------------------------------


def test_short_distillation_improves_mode_coverage(tmp_path):
    """A few hundred generator updates on an (equal-weight) 8-mode ring, through the training loop:
    the student starts collapsed at the centre (no mode covered, no sample near a mode) and ends
    with samples on the modes."""
    from fdistill import train

    c = tiny_config("js")
    c.data.imbalance = 1.0
    c.model.width = 64
    c.model.depth = 2
    c.distill.lr_gen = 1e-3
    c.train.num_steps = 300
    c.train.log_every = 100
    c.train.checkpoint_every = 300
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(c.train.seed))
    x0, _ = obj.evaluator.samples(state.params["gen"], jax.random.PRNGKey(0), 4096)
    before = obj.source.evaluate_samples(x0)

    # One device: the 8-device path is covered by the mesh test above; hundreds of steps of 8 simulated
    # devices on a loaded 2-core machine can exceed XLA's 40 s all-reduce rendezvous timeout.
    results = train.train_and_evaluate(c, str(tmp_path), num_devices=1)
    assert before["mode_coverage"] == 0.0 and before["high_quality_frac"] < 0.01, before
    assert results["mode_coverage"] > before["mode_coverage"], results
    assert results["high_quality_frac"] > 0.3, results
    assert results["mmd"] < before["mmd"] / 2, (results["mmd"], before["mmd"])
    for k in ("teacher/mode_coverage", "teacher/samples_per_sec", "speedup", "samples_per_sec", "ratio_spearman"):
        assert np.isfinite(results[k]), k
    assert results["nfe"] == 1 and results["teacher/nfe"] == 2 * c.eval.num_steps - 1
    assert results["teacher/mode_coverage"] == 1.0
    rows = logged_rows(tmp_path)
    assert any("h/max" in r and "loss_disc" in r and "loss_fake" in r for r in rows)
    assert os.listdir(tmp_path / "plots")


def test_network_teacher_from_a_score_run(tmp_path):
    """distill.teacher=<workdir of a score run>: generator and fake score start from the teacher's EMA
    parameters, the teacher stays in `frozen`, evaluation samples the network teacher, and FastGen's
    discriminator (heads on the frozen teacher's features) trains. An unfinished teacher run and a
    teacher of other data are refused, naming the field."""
    from fdistill import train
    from tests.helpers import tiny_score_config

    teacher_dir = str(tmp_path / "teacher")
    c = tiny_config("kl", teacher=teacher_dir)
    teacher_config = tiny_score_config(num_steps=10)
    teacher_config.data = c.data  # the student's mixture (20:1 imbalance)
    train.train_and_evaluate(teacher_config, teacher_dir, num_devices=1)

    c.eval.num_steps = 4
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    from fdistill.objectives import score

    _, ema, _ = score.load_teacher(teacher_dir)
    chex.assert_trees_all_close(state.params["gen"], ema)
    chex.assert_trees_all_close(state.params["fake"], ema)
    chex.assert_trees_all_close(frozen["teacher"], ema)
    step = jax.jit(obj.train_step)
    for i in range(2):
        state, metrics = step(state, frozen, obj.batch(i))
    assert np.isfinite(float(metrics["loss"]))
    results = obj.evaluate(state, frozen, jax.random.PRNGKey(1))
    assert results["teacher/nfe"] == 7 and np.isfinite(results["teacher/mmd"]) and results["speedup"] > 0

    heads = objectives.build(tiny_config("js", teacher=teacher_dir, disc_on="teacher", disc_heads=3))
    s, fz = heads.init(jax.random.PRNGKey(0))
    assert set(s.params["disc"]) == {"head"}  # no trunk of its own: the teacher's features
    new, m = jax.jit(heads.train_step)(s, fz, heads.batch(0))
    assert np.isfinite(float(m["loss_disc"])) and np.isfinite(float(m["loss"]))
    chex.assert_trees_all_close(fz["teacher"], ema)  # the teacher stays frozen

    c_bad = tiny_config("kl", teacher=teacher_dir)
    c_bad.data.imbalance = c.data.imbalance + 1.0
    with pytest.raises(ValueError, match=r"config\.distill\.teacher=.*other data/diffusion settings: config\.data\.imbalance="):
        objectives.build(c_bad)
    os.remove(os.path.join(teacher_dir, "results.json"))
    with pytest.raises(FileNotFoundError, match="config.distill.teacher=.*unfinished"):
        objectives.build(tiny_config("kl", teacher=teacher_dir))
    assert objectives.build(tiny_config("kl", teacher=teacher_dir, allow_unfinished_teacher=True))


# ----- pieces alone ---------------------------------------------------------------------------------


def test_analytic_teacher_is_the_exact_mixture_denoiser():
    c = tiny_config()
    source = __import__("fdistill.data", fromlist=["build"]).build(c.data)
    teacher = teachers.build(c, source)
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 2))
    sigma = jnp.linspace(0.01, 10.0, 32)
    np.testing.assert_allclose(np.asarray(teacher(teacher.frozen(), x, sigma)),
                               np.asarray(source.gmm.denoise(x, sigma)), rtol=1e-6)
    # its score (D - x) / sigma^2 is the autodiff score of the noised mixture
    score = (teacher(teacher.frozen(), x, sigma) - x) / sigma[:, None] ** 2
    auto = jax.vmap(jax.grad(lambda y, s: source.gmm.log_prob(y[None], s[None])[0]))(x, sigma)
    np.testing.assert_allclose(np.asarray(score), np.asarray(auto), rtol=1e-3, atol=1e-3)


def test_one_step_student_sample_and_training_point():
    obj = objectives.build(tiny_config())
    state, _ = obj.init(jax.random.PRNGKey(0))
    gen, st = state.params["gen"], obj.student
    d = st.draws(jax.random.PRNGKey(1), 64)
    pt = st.train_point(gen, d)
    expect = st.denoiser(gen, 80.0 * d["z"], jnp.full((64,), 80.0))
    np.testing.assert_allclose(np.asarray(pt["x"]), np.asarray(expect), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.sample(gen, d["z"])), np.asarray(expect), rtol=1e-6)
    idx = np.asarray(pt["index"])
    assert idx.min() >= obj.levels.lo and idx.max() <= obj.levels.hi and np.all(np.asarray(pt["step"]) == 0)
    np.testing.assert_allclose(np.asarray(pt["sigma"]), np.asarray(obj.levels.grid)[idx])
    assert np.all(np.diff(np.asarray(obj.levels.grid)) > 0)  # ascending: index 0 = sigma_min


def test_critic_fake_loss_weighting_by_hand():
    """fake_loss='edm': lambda(sigma) mean (D_fake - x)^2; 'x0_mse': the unweighted mean (FastGen)."""
    from fdistill import diffusion

    for fake_loss in ("edm", "x0_mse"):
        obj = objectives.build(tiny_config("rkl", lambda_gan=0.0, fake_loss=fake_loss))
        state, frozen = obj.init(jax.random.PRNGKey(0))
        point = obj.student.train_point(state.params["gen"], obj.student.draws(jax.random.PRNGKey(2), 64))
        key = jax.random.PRNGKey(3)
        loss, _ = obj.critic.loss(state.params, frozen["teacher"], point, jnp.zeros((64, 2)), jnp.zeros(64, jnp.int32), key)
        x_t, sigma, _ = obj.critic.fake_targets(point, jax.random.split(key, 3)[0])
        err = np.mean((np.asarray(obj.critic.fake_denoise(state.params, x_t, sigma)) - np.asarray(point["x"])) ** 2, 1)
        w = np.asarray(diffusion.loss_weight(sigma, 0.5)) if fake_loss == "edm" else 1.0
        np.testing.assert_allclose(float(loss), np.mean(w * err), rtol=1e-4)


def test_ratio_binning_by_index_and_by_sigma():
    idx = jnp.arange(20, 981)
    b = np.asarray(losses.ratio_bin_index("index", 10, idx, None, 20, 980, 0.002, 80.0))
    np.testing.assert_array_equal(b, (np.arange(20, 981) - 20) * 10 // 961)
    counts = np.bincount(b)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1  # equal-count bins of the index range
    sigma = jnp.array([0.002, 7.9, 8.0, 40.0, 79.99, 80.0])
    b = np.asarray(losses.ratio_bin_index("sigma", 10, None, sigma, 20, 980, 0.002, 80.0))
    np.testing.assert_array_equal(b, [0, 0, 0, 4, 9, 9])  # FastGen: equal-width bins of sigma


def test_the_noise_range_moves_from_gen_index_max_to_gen_index_max_end():
    """hi(p) = round(max + p (end - max)): the range at progress 0, 1/2 and 1; -1 keeps it fixed
    (the same draws as without progress); out-of-range values and TDM are errors naming the field."""
    from fdistill.distillation import students

    c = tiny_distill_config(gen_index_min=100, gen_index_max=300, gen_index_max_end=150)
    levels = students.NoiseLevels(c.distill, c.diffusion)
    key = jax.random.PRNGKey(0)
    draw = jax.jit(lambda p: levels.draw_index(key, 20000, p))
    for p, hi in [(0.0, 300), (0.5, 225), (1.0, 150), (2.0, 150)]:
        idx = np.asarray(draw(p))
        assert idx.min() == 100 and idx.max() == hi, (p, idx.min(), idx.max())
    fixed = students.NoiseLevels(tiny_distill_config(gen_index_min=100, gen_index_max=300).distill, c.diffusion)
    np.testing.assert_array_equal(fixed.draw_index(key, 64, 0.7), fixed.draw_index(key, 64))
    with pytest.raises(ValueError, match=r"config.distill.gen_index_max_end=50 must lie in \[gen_index_min, "):
        students.NoiseLevels(tiny_distill_config(gen_index_min=100, gen_index_max_end=50).distill, c.diffusion)
    with pytest.raises(ValueError, match="gen_index_max_end must be -1 for TDM"):
        objectives.build(tiny_distill_config("gmm_tdm", gen_index_max_end=500))
    # the objective gives the draws its progress: update / train.num_steps
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(1))
    assert float(obj.progress(state.replace(step=jnp.int32(c.train.num_steps // 2)))) == 0.5
    assert "train.num_steps" in obj.trajectory_fields
    state, metrics = jax.jit(obj.train_step)(state, frozen, {k: jnp.asarray(v) for k, v in obj.batch(0).items()})
    assert np.isfinite(float(metrics["loss"]))


def test_critic_schedules_count_generator_updates():
    """A critic steps `fake_updates_per_gen` = K times per generator update (its optimiser's count is K n
    after n updates), so its warm-up and cosine decay run over K times its own steps: at generator update
    g every network's rate is lr w(g) with w = g / warmup_steps during the warm-up, then
    (1 + cos(pi (g - warmup) / (num_steps - warmup))) / 2, reaching 0 at train.num_steps."""
    c = tiny_config("js", fake_updates_per_gen=3)
    c.train.lr_schedule, c.train.num_steps, c.train.warmup_steps = "cosine", 10, 2
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    step = jax.jit(obj.train_step)
    for i in range(2):
        state, _ = step(state, frozen, obj.batch(i))
    counts = {k: {int(v) for _, v in optax.tree_utils.tree_get_all_with_path(state.opt_state[k], "count")}
              for k in ("gen", "fake", "disc")}  # Adam's and the schedule's counts
    assert counts == {"gen": {2}, "fake": {6}, "disc": {6}}, counts
    per_update = {"gen": 1, "fake": 3, "disc": 3}
    for g, w in [(1, 0.5), (2, 1.0), (6, 0.5), (10, 0.0)]:
        for name, k in per_update.items():
            sched = obj.optimizers[name].settings.schedule()
            np.testing.assert_allclose(float(sched(k * g)), c.train.learning_rate * w, atol=1e-9, err_msg=(name, g))


def test_divergence_end_moves_h_from_one_divergence_to_another():
    """divergence='js', divergence_end='rkl': h = (1 - p) h_js / mean h_js + p at progress p (the
    normalised rkl weight is exactly 1), on one fixed batch and discriminator; an unknown name fails
    naming the field, and the run's trajectory depends on train.num_steps."""
    c = tiny_config("js", divergence_end="rkl")
    obj = objectives.build(c)
    assert obj.use_disc and "train.num_steps" in obj.trajectory_fields
    state, frozen = obj.init(jax.random.PRNGKey(0))
    draws = obj.student.draws(jax.random.PRNGKey(1), 64)
    loss = jax.jit(obj.generator_loss)

    def h_at(p):
        return np.asarray(loss(state.params["gen"], state.params, frozen, {**draws, "progress": jnp.float32(p)},
                               state.extra["ratio_bins"])[1][2]["h"])

    h0, h_half, h1 = h_at(0.0), h_at(0.5), h_at(1.0)
    js = objectives.build(tiny_config("js"))
    h_js = np.asarray(jax.jit(js.generator_loss)(state.params["gen"], state.params, frozen, draws,
                                                 state.extra["ratio_bins"])[1][2]["h"])
    np.testing.assert_allclose(h0, h_js, rtol=1e-6)
    assert h0.std() > 0.01  # the discriminator's ratios differ between samples
    np.testing.assert_allclose(h1, 1.0, rtol=1e-6)
    np.testing.assert_allclose(h_half, 0.5 * h0 + 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="config.distill.divergence_end='kullback' is not known"):
        objectives.build(tiny_config("js", divergence_end="kullback"))
