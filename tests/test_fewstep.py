"""Few-step students (fdistill/distillation/students.py): DMD2 backward simulation and TDM.

K = 1 is the one-step 'distill' step; the backward simulation is a function of the generator's
parameters and noise only (no teacher call, a hand-written rollout); TDM's trajectory, segment
noise levels, mixed noise, importance weight and fake loss by hand; the step compiles once; a
short 4-step run beats its initialisation."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives
from fdistill.configs import load as load_config
from fdistill.distillation import students
from tests.helpers import tiny_distill_config


def tiny(name="gmm_dmd2_multistep", K=4, **distill_kw):
    """The named config with a small network and batch (a step in milliseconds)."""
    return tiny_distill_config(name, num_student_steps=K, **distill_kw)


class CountingTeacher:
    """Wraps the teacher denoiser and counts its calls (traced calls count too)."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, 0

    def __getattr__(self, name):  # everything but the calls is the wrapped teacher's
        return getattr(self.teacher, name)

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.teacher(*a, **kw)


# ----- schedule -----------------------------------------------------------------------------------


def test_student_sigmas_default_explicit_and_errors():
    s4 = students.student_sigmas(4, "karras", 80.0, 0.002, 7.0)
    r = 1 / 7
    expect = [(80**r + i / 4 * (0.002**r - 80**r)) ** 7 for i in range(4)]  # EDM eq. 5, 5 points, last dropped
    np.testing.assert_allclose(s4, expect, rtol=1e-5)
    assert students.student_sigmas(1, "karras", 80.0, 0.002, 7.0).tolist() == [80.0]
    np.testing.assert_allclose(students.student_sigmas(2, "80, 1.5", 80.0, 0.002, 7.0), [80, 1.5])
    for bad in ("80,90", "80", "fast", "80,-1"):
        with pytest.raises(ValueError, match="config.distill.student_sigmas"):
            students.student_sigmas(2, bad, 80.0, 0.002, 7.0)
    with pytest.raises(ValueError, match="config.distill.num_student_steps"):
        objectives.build(tiny(K=0))


# ----- K = 1 is the one-step objective -----------------------------------------------------------


def test_k1_backward_simulation_is_exactly_the_distill_step():
    """Same config, same key: the 'dmd2_multistep' step with K = 1 gives the 'distill' losses and
    parameters (JS with the discriminator and the GAN term, so every network is involved)."""
    c = tiny(K=1, divergence="js", lambda_gan=1e-3)
    base = c.copy_and_resolve_references()
    base.objective = "distill"
    few, ref = objectives.build(c), objectives.build(base)
    s_few, frozen = few.init(jax.random.PRNGKey(0))
    s_ref, _ = ref.init(jax.random.PRNGKey(0))
    chex.assert_trees_all_equal(s_few.params, s_ref.params)
    step_few, step_ref = jax.jit(few.train_step), jax.jit(ref.train_step)
    for i in range(3):
        s_few, m_few = step_few(s_few, frozen, few.batch(i))
        s_ref, m_ref = step_ref(s_ref, frozen, ref.batch(i))
        assert set(m_few) == set(m_ref)
        for k in m_ref:
            np.testing.assert_allclose(float(m_few[k]), float(m_ref[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    chex.assert_trees_all_close(s_few.params, s_ref.params, rtol=1e-5, atol=1e-7)
    # and the K = 1 sampler is G(z) = D_gen(80 z; 80)
    z = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
    chex.assert_trees_all_close(few.student.sample(s_few.params["gen"], z), ref.student.sample(s_few.params["gen"], z))


def test_k1_tdm_generator_update_is_the_one_step_update():
    """TDM with K = 1: one segment [0, 80), x_mid = x0_theta, x_t = x0_theta + sigma xi: the
    generator loss and its gradient equal the 'distill' ones on the same draws."""
    c = tiny("gmm_tdm", K=1, divergence="js", lambda_gan=1e-3)
    base = c.copy_and_resolve_references()
    base.objective = "distill"
    few, ref = objectives.build(c), objectives.build(base)
    lo, hi = few.levels.lo, few.levels.hi
    assert few.student.segment_lo.tolist() == [lo] and few.student.segment_hi.tolist() == [hi]
    state, frozen = few.init(jax.random.PRNGKey(0))
    draws = few.student.draws(jax.random.PRNGKey(5), 64)
    args = (state.params, frozen, draws, state.extra["ratio_bins"])
    g_few, (a_few, b_few, _) = jax.grad(few.generator_loss, has_aux=True)(state.params["gen"], *args)
    g_ref, (a_ref, b_ref, _) = jax.grad(ref.generator_loss, has_aux=True)(state.params["gen"], *args)
    chex.assert_trees_all_close(g_few, g_ref, rtol=1e-4, atol=1e-7)
    for k in a_ref:
        np.testing.assert_allclose(float(a_few[k]), float(a_ref[k]), rtol=1e-4, atol=1e-7, err_msg=k)


# ----- backward simulation -----------------------------------------------------------------------


def test_backward_simulation_uses_only_the_generator_and_noise():
    """The training input of step k is the hand-written rollout of the *generator* (fresh noise
    re-noising); the teacher is never called to build it, the gradient flows through the last
    call only, and the generator loss calls the teacher exactly once (D_real at x_t, a score)."""
    c = tiny(K=4, divergence="js")
    obj = objectives.build(c)
    obj.teacher = counter = CountingTeacher(obj.teacher)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    gen, st = state.params["gen"], obj.student
    b = 32
    d = st.draws(jax.random.PRNGKey(3), b)
    k, noise = d["k"], d["noise"]
    assert set(np.asarray(k).tolist()) == {0, 1, 2, 3} and noise.shape == (3, b, 2)
    x = st.train_point(gen, d)["x"]
    s = st.sigmas

    def manual_start(params):  # every step for every example, then each example's own step k
        states = [s[0] * d["z"]]
        for i in range(3):
            x0 = st.denoiser(params, states[-1], jnp.full((b,), s[i]))
            states.append(x0 + s[i + 1] * noise[i])
        states = np.stack([np.asarray(v) for v in states])  # [K, B, 2]
        return jnp.asarray(states[np.asarray(k), np.arange(b)]), jnp.asarray(s)[k]

    xk, sk = manual_start(gen)
    np.testing.assert_allclose(np.asarray(x), np.asarray(st.denoiser(gen, xk, sk)), rtol=1e-5, atol=1e-6)
    # gradient only through the final call at the (stop-gradient) backward-simulated input
    g = jax.grad(lambda p: jnp.sum(st.train_point(p, d)["x"] ** 2))(gen)
    g_ref = jax.grad(lambda p: jnp.sum(st.denoiser(p, xk, sk) ** 2))(gen)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-6)
    # the sampler and the critic's update never touch the teacher either
    obj.evaluator.samples(gen, jax.random.PRNGKey(1), 64)
    obj.critic_update(state, frozen, jnp.zeros((b, 2)), jnp.zeros((b,), jnp.int32), jax.random.PRNGKey(2))
    assert counter.calls == 0
    obj.generator_loss(gen, state.params, frozen, d, state.extra["ratio_bins"])
    assert counter.calls == 1


def test_k_step_sampler_is_the_backward_simulation_at_the_last_step():
    """Sampling = K calls: x_{i+1} = D(x_i; s_i) + s_{i+1} n_i, output D(x_{K-1}; s_{K-1}); the
    re-noising noise differs between chunks and between examples."""
    obj = objectives.build(tiny(K=3))
    state, _ = obj.init(jax.random.PRNGKey(0))
    gen, st = state.params["gen"], obj.student
    z = jax.random.normal(jax.random.PRNGKey(4), (8, 2))
    noise = st._eval_noise(z)
    x = s0 = st.sigmas[0] * z
    for i in range(3):
        x0 = st.denoiser(gen, x, jnp.full((8,), st.sigmas[i]))
        x = x0 + st.sigmas[i + 1] * noise[i] if i < 2 else x0
    np.testing.assert_allclose(np.asarray(st.sample(gen, z)), np.asarray(x), rtol=1e-5, atol=1e-6)
    assert s0.shape == (8, 2)
    other = st._eval_noise(jax.random.normal(jax.random.PRNGKey(5), (8, 2)))
    assert float(jnp.abs(other - noise).min()) > 0
    assert abs(float(jnp.corrcoef(noise[0, :, 0], noise[1, :, 0])[0, 1])) < 0.9


# ----- TDM -----------------------------------------------------------------------------------------


def test_tdm_trajectory_segments_mixed_noise_and_fake_loss_by_hand():
    c = tiny("gmm_tdm", K=4)
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    gen, st = state.params["gen"], obj.student
    s = np.concatenate([st.sigmas, [0.0]])
    # deterministic DDIM sampler: x_{i+1} = x0 + s_{i+1} (x_i - x0) / s_i
    z = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
    x = s[0] * z
    for i in range(4):
        x0 = st.denoiser(gen, x, jnp.full((16,), s[i]))
        x = x0 + s[i + 1] * (x - x0) / s[i]
    np.testing.assert_allclose(np.asarray(st.sample(gen, z)), np.asarray(x), rtol=1e-5, atol=1e-6)

    b = 256
    d = st.draws(jax.random.PRNGKey(2), b)
    k = np.asarray(d["k"])
    grid = np.asarray(obj.levels.grid)
    sigma = grid[np.asarray(d["index"])]
    lo_allowed, hi_allowed = grid[obj.levels.lo], grid[obj.levels.hi]
    for kk in range(4):  # sampling-steps-aware: sigma inside the example's own segment
        sel = k == kk
        assert sel.any()
        assert np.all(sigma[sel] >= max(s[kk + 1], lo_allowed) - 1e-6) and np.all(sigma[sel] < s[kk])
        assert np.all(sigma[sel] <= hi_allowed + 1e-6)
    pt = st.train_point(gen, d)
    # by hand, per example: deterministic rollout to x_k, eps_theta, x_mid, forward diffusion
    states, preds = [s[0] * np.asarray(d["z"])], []
    for i in range(4):
        x0 = np.asarray(st.denoiser(gen, jnp.asarray(states[-1]), jnp.full((b,), s[i])))
        preds.append(x0)
        states.append(x0 + s[i + 1] * (states[-1] - x0) / s[i])
    xk, x0 = np.stack(states)[k, np.arange(b)], np.stack(preds)[k, np.arange(b)]
    eps_theta = (xk - x0) / s[k][:, None]
    x_mid = x0 + s[k + 1][:, None] * eps_theta
    xi = np.asarray(d["eps"])
    x_t = x_mid + np.sqrt(sigma**2 - s[k + 1] ** 2)[:, None] * xi
    np.testing.assert_allclose(np.asarray(pt["x"]), x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pt["x"] + pt["sigma"][:, None] * pt["noise"]), x_t, rtol=1e-4, atol=1e-5)
    mixed = (x_t - x0) / sigma[:, None]
    np.testing.assert_allclose(np.asarray(pt["noise"]), mixed, rtol=1e-4, atol=1e-4)
    w_is = np.exp(-0.5 * (mixed**2).mean(1)) / np.exp(-0.5 * (xi**2).mean(1))
    np.testing.assert_allclose(np.asarray(students.importance_weight(pt["noise"], d["eps"])), w_is, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pt["fake_weight"]), np.minimum(1 / sigma**2, 5.0) * w_is, rtol=1e-4)
    d_fake = np.asarray(st.denoiser(state.params["fake"], jnp.asarray(x_t), jnp.asarray(sigma)))
    expect = np.mean(np.minimum(1 / sigma**2, 5.0) * w_is * ((d_fake - x0) ** 2).mean(1))
    loss_fn = lambda p, pt: obj.critic.loss(p, frozen["teacher"], pt, jnp.zeros((b, 2)),  # noqa: E731
                                            jnp.zeros(b, jnp.int32), jax.random.PRNGKey(0))[0]
    for use_jit in (False, True):
        fn = jax.jit(loss_fn) if use_jit else loss_fn
        np.testing.assert_allclose(float(fn(state.params, pt)), expect, rtol=1e-4)


def test_tdm_generator_gradient_flows_through_x0_theta_only():
    """Reverse KL without GAN: the gradient is that of 0.5 mean((x0 - sg(x0 - g))^2),
    g = (D_fake - D_real)(x_t) / mean|x0 - D_real|, x0 = D_gen(x_k; s_k), written independently."""
    obj = objectives.build(tiny("gmm_tdm", K=4))
    assert not obj.use_disc
    state, frozen = obj.init(jax.random.PRNGKey(0))
    gen, fake, st = state.params["gen"], state.params["fake"], obj.student
    d = st.draws(jax.random.PRNGKey(7), 64)
    pt = st.train_point(gen, d)
    x_k, sigma_k = st.rollout_start(gen, d["z"], d["labels"], d["k"])
    g = jax.grad(lambda p: obj.generator_loss(p, state.params, frozen, d, state.extra["ratio_bins"])[0])(gen)
    x_t = pt["x"] + pt["sigma"][:, None] * pt["noise"]
    d_real = frozen["teacher"].denoise(x_t, pt["sigma"])
    d_fake = st.denoiser(fake, x_t, pt["sigma"])

    def loss(p):
        x0 = st.denoiser(p, x_k, sigma_k)
        w = 1 / (jnp.mean(jnp.abs(pt["x"] - d_real), axis=1, keepdims=True) + 1e-6)
        grad = (d_fake - d_real) * w
        return 0.5 * jnp.mean((x0 - jax.lax.stop_gradient(x0 - grad)) ** 2)

    chex.assert_trees_all_close(g, jax.grad(loss)(gen), rtol=1e-3, atol=1e-6)


# ----- the compiled step and training -----------------------------------------------------------------


@pytest.mark.parametrize("name,divergence", [("gmm_dmd2_multistep", "js"), ("gmm_tdm", "kl")])
def test_step_compiles_once_and_updates_everything(name, divergence):
    obj = objectives.build(tiny(name, K=4, divergence=divergence))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(obj.train_step, n=1))
    s = state
    for i in range(3):
        s, m = step(s, frozen, obj.batch(i))
    assert int(s.step) == 3
    for key, v in m.items():
        assert np.isfinite(float(v)), key
    for net in ("gen", "fake") + (("disc",) if obj.use_disc else ()):
        moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s.params[net], state.params[net])
        assert max(jax.tree.leaves(moved)) > 0, net


def test_short_four_step_runs_improve_over_initialisation(tmp_path):
    """250 generator updates through the training loop, on an equal-weight 8-mode ring with the
    analytic teacher: both 4-step students start with no mode covered and no sample near a mode
    (a random generator), and end with modes covered, samples on the modes and a lower MMD, and NFE = 4."""
    from fdistill import train

    for name in ("gmm_dmd2_multistep", "gmm_tdm"):
        c = tiny(name, K=4)
        c.data.imbalance = 1.0
        c.model.width = 64
        c.model.depth = 2
        c.train.num_steps = 250
        c.train.log_every = 125
        c.train.checkpoint_every = 250
        obj = objectives.build(c)
        state, _ = obj.init(jax.random.PRNGKey(c.train.seed))
        x0, _ = obj.evaluator.samples(state.params["gen"], jax.random.PRNGKey(0), 4096)
        before = obj.source.evaluate_samples(x0)
        results = train.train_and_evaluate(c, str(tmp_path / name), num_devices=1)
        assert before["mode_coverage"] == 0.0 and before["high_quality_frac"] < 0.01, (name, before)
        assert results["mode_coverage"] > before["mode_coverage"], (name, results)
        assert results["high_quality_frac"] > before["high_quality_frac"] + 0.1, (name, results)
        assert results["mmd"] < 0.75 * before["mmd"], (name, results["mmd"], before["mmd"])
        assert results["nfe"] == 4 and np.isfinite(results["samples_per_sec"])


@pytest.mark.parametrize("name,objective", [("gmm_dmd2_multistep", "dmd2_multistep"), ("gmm_tdm", "tdm"),
                                            ("digits_dmd2_multistep", "dmd2_multistep"), ("digits_tdm", "tdm")])
def test_named_configs(name, objective):
    """The configs name their objective and K = 4; the GMM ones build (digits ones need a teacher run)."""
    c = load_config(name)
    assert c.objective == objective and c.distill.num_student_steps == 4
    assert (c.distill.lambda_gan == 0) == (objective == "tdm")
    if name.startswith("gmm"):
        obj = objectives.build(c)
        assert obj.student.num_steps == 4 and obj.student.sigmas[0] == c.distill.gen_sigma


# ----- the step-aware critic ----------------------------------------------------------------------


def _perturbed(params, seed=9):
    """Every parameter moved a little (zero-initialised output layers make fresh networks ignore
    their conditioning)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("divergence", ["rkl", "js"])
def test_step_aware_critic_sees_the_step(divergence):
    """With `step_aware_critic` the critic loss on a fixed batch changes when the step labels are
    permuted (the fake score and discriminator are conditioned on the step); the pooled critic's
    does not."""
    for aware in (True, False):
        obj = objectives.build(tiny(K=4, divergence=divergence, lambda_gan=0.0, step_aware_critic=aware))
        state, frozen = obj.init(jax.random.PRNGKey(0))
        params = _perturbed(state.params)
        point = obj.student.train_point(params["gen"], obj.student.draws(jax.random.PRNGKey(1), 64))
        real = jnp.asarray(obj.batch(0)["x"][:, 0])
        args = (real, jnp.zeros(64, jnp.int32), jax.random.PRNGKey(2))
        loss = float(obj.critic.loss(params, frozen["teacher"], point, *args)[0])
        permuted = {**point, "step": jnp.roll(point["step"], 1)}
        loss_perm = float(obj.critic.loss(params, frozen["teacher"], permuted, *args)[0])
        assert (loss != loss_perm) == aware, (aware, loss, loss_perm)
        if aware:  # one embedding row per step: (K, emb_dim)
            assert params["fake"]["Embed_0"]["embedding"].shape[0] == 4


def test_step_aware_critic_with_k1_is_the_one_step_critic():
    """K = 1: nothing to condition on, so the step-aware option builds exactly the one-step objective."""
    c = tiny(K=1, divergence="js", lambda_gan=1e-3, step_aware_critic=True)
    base = c.copy_and_resolve_references()
    base.objective, base.distill.step_aware_critic = "distill", False
    few, ref = objectives.build(c), objectives.build(base)
    s_few, frozen = few.init(jax.random.PRNGKey(0))
    s_ref, _ = ref.init(jax.random.PRNGKey(0))
    chex.assert_trees_all_equal(s_few.params, s_ref.params)
    for i in range(2):
        s_few, m_few = jax.jit(few.train_step)(s_few, frozen, few.batch(i))
        s_ref, m_ref = jax.jit(ref.train_step)(s_ref, frozen, ref.batch(i))
    chex.assert_trees_all_close(s_few.params, s_ref.params, rtol=1e-5, atol=1e-7)


def test_step_aware_fake_score_from_a_teacher_starts_as_the_teacher():
    """Started from teacher weights, the step-aware fake score's extra class embedding is zero: it
    computes the teacher's denoiser for every step."""
    from fdistill.distillation.critics import copy_matching

    obj = objectives.build(tiny(K=4, step_aware_critic=True))
    state, _ = obj.init(jax.random.PRNGKey(0))
    teacher = _perturbed(state.params["gen"])  # an unconditional "teacher" network
    fake = copy_matching(teacher, state.params["fake"])
    x, s = jax.random.normal(jax.random.PRNGKey(3), (16, 2)), jnp.full((16,), 0.5)
    want = obj.student.denoiser(teacher, x, s)
    for k in range(4):
        got = obj.critic.fake_denoise({"fake": fake}, x, s, None, jnp.full((16,), k, jnp.int32))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_per_step_mode_diagnostic_on_a_hand_built_sample_set():
    """`fewstep_step_modes.step_weights` counts the samples nearest each mode."""
    from experiments.diagnostics.fewstep_step_modes import step_weights

    obj = objectives.build(tiny(K=2))
    means = np.asarray(obj.source.gmm.means)
    x = np.concatenate([np.repeat(means[:1], 30, 0), np.repeat(means[3:4], 10, 0) + 0.01])  # 3:1 on modes 0, 3
    w = step_weights(x, obj.source.gmm)
    expect = np.zeros(len(means))
    expect[0], expect[3] = 0.75, 0.25
    np.testing.assert_allclose(w, expect)
