"""On-policy preference optimisation (GRPO, RLOO, online DPO): each piece against NumPy or a hand
computation, and each step compiled once on the tiny 'init' setup (random reference, no SFT run)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.data import preference as prefdata
from fdistill.objectives import language, online
from tests.test_language import tiny_dpo_config


def setup(objective, **po):
    c = tiny_dpo_config("unused", reference="init", **po)
    c.objective = objective
    c.train.batch_size = 8
    return language.build_po_setup(c)


def test_true_reward_and_mask_match_the_task_on_sampled_sequences():
    obj, state, frozen, batch = setup("grpo", group_size=4)
    tokens, mask = obj.rollout(state.params, jnp.asarray(batch["prompts"]), jax.random.PRNGKey(3))
    tokens = np.asarray(tokens)
    words, n = obj.task.split_responses(tokens)
    want = obj.task.reward(tokens[:, :prefdata.PROMPT_LEN], words, n)
    np.testing.assert_allclose(obj.task.sequence_reward(jnp.asarray(tokens)), want, rtol=1e-6)
    _, want_mask, lengths = obj.task.sequences(tokens[:, :prefdata.PROMPT_LEN], words, n)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    assert tokens.shape[0] == 8 * 4 and np.all(np.asarray(mask).sum(1) == lengths)


def test_group_advantages_are_zero_mean_per_group_and_rloo_baseline_excludes_the_sample():
    r = jnp.asarray([1.0, 2.0, 4.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv = np.asarray(online.group_advantages(r, 4)).reshape(2, 4)
    np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-6)
    g = np.array([1.0, 2.0, 4.0, 0.0])
    np.testing.assert_allclose(adv[0], (g - g.mean()) / (g.std() + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(adv[1], 0.0)  # equal rewards: no signal
    base = np.asarray(online.leave_one_out_baseline(r, 4)).reshape(2, 4)
    np.testing.assert_allclose(base[0], [(2 + 4 + 0) / 3, (1 + 4 + 0) / 3, (1 + 2 + 0) / 3, (1 + 2 + 4) / 3], rtol=1e-6)
    np.testing.assert_allclose(base[1], 5.0)


def test_grpo_loss_clipping_and_kl_estimator():
    rng = np.random.default_rng(0)
    b, t = 6, 5
    logp = jnp.asarray(-rng.uniform(0.1, 3, (b, t)), jnp.float32)
    ref = jnp.asarray(-rng.uniform(0.1, 3, (b, t)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=b), jnp.float32)
    mask = jnp.asarray(rng.random((b, t)) < 0.8, jnp.float32)
    # ratio 1 (one update per rollout): the clipped objective equals the unclipped one, value and gradient
    f = lambda lp, eps: online.grpo_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, eps, 0.04)[0]
    for eps in (1e-3, 0.2):
        v, g = jax.value_and_grad(f)(logp, eps)
        v_big, g_big = jax.value_and_grad(f)(logp, 0.999)
        np.testing.assert_allclose(v, v_big, rtol=1e-6)
        np.testing.assert_allclose(g, g_big, rtol=1e-6)
    # against NumPy with ratios away from 1
    old = logp + jnp.asarray(rng.normal(0, 0.3, (b, t)), jnp.float32)
    loss, m = online.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04)
    lp, o, rf, a, mk = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask))
    ratio = np.exp(lp - o)
    sur = np.minimum(ratio * a[:, None], np.clip(ratio, 0.8, 1.2) * a[:, None])
    k3 = np.exp(rf - lp) - (rf - lp) - 1
    want = -np.mean(((sur - 0.04 * k3) * mk).sum(1) / np.maximum(mk.sum(1), 1))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert np.all(k3 >= 0) and float(m["k3"]) >= 0
    np.testing.assert_allclose(m["clip_frac"], ((np.abs(ratio - 1) > 0.2) & (mk > 0)).sum() / mk.sum(), rtol=1e-6)


def test_rloo_loss_matches_numpy():
    rng = np.random.default_rng(1)
    seq, ref, r = (jnp.asarray(rng.normal(size=8), jnp.float32) for _ in range(3))
    loss, _ = online.rloo_loss(seq, ref, r, 4, 0.05)
    pen = np.asarray(r, np.float64) - 0.05 * (np.asarray(seq) - np.asarray(ref))
    g = pen.reshape(2, 4)
    adv = (g - (g.sum(1, keepdims=True) - g) / 3).reshape(-1)
    np.testing.assert_allclose(loss, -np.mean(adv * np.asarray(seq)), rtol=1e-5)
    # the penalised reward is a constant: the gradient is -adv / B per sequence log-probability
    grad = jax.grad(lambda s: online.rloo_loss(s, ref, r, 4, 0.05)[0])(seq)
    np.testing.assert_allclose(grad, -adv / 8, rtol=1e-5)


def test_online_dpo_pairs_come_from_the_current_policy():
    obj, state, frozen, batch = setup("online_dpo")
    prompts, key = jnp.asarray(batch["prompts"]), jax.random.PRNGKey(0)
    t1, _ = obj.rollout(state.params, prompts, key)
    assert t1.shape[0] == 2 * prompts.shape[0]
    np.testing.assert_array_equal(np.asarray(t1[::2, :prefdata.PROMPT_LEN]), np.asarray(prompts))
    moved = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(1), x.shape), state.params)
    t2, _ = obj.rollout(moved, prompts, key)
    assert np.any(np.asarray(t1) != np.asarray(t2))  # same key, another policy: other pairs


@pytest.mark.parametrize("objective", ["grpo", "rloo", "online_dpo"])
def test_on_policy_step_compiles_once_and_moves_the_policy(objective):
    obj, state, frozen, _ = setup(objective, group_size=4)
    step = jax.jit(chex.assert_max_traces(obj.train_step, n=1))
    before = jax.tree.map(np.asarray, state.params)
    for i in range(3):
        state, m = step(state, frozen, {k: jnp.asarray(v) for k, v in obj.batch(i).items()})
    for k in ("loss", "reward", "kl", "length", "grad_norm"):
        assert np.isfinite(float(m[k])), k
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before)
    assert max(jax.tree.leaves(moved)) > 0
    chex.clear_trace_counter()
    # the step's prompts are a function of (seed, step) only, and processes split them
    np.testing.assert_array_equal(np.concatenate([obj.batch(7, i, 2)["prompts"] for i in range(2)]),
                                  obj.batch(7)["prompts"])


def test_bad_on_policy_settings_are_named():
    with pytest.raises(ValueError, match="config.po.group_size must be >= 2"):
        setup("grpo", group_size=1)
    with pytest.raises(ValueError, match=r"config.po.clip_eps must be in \(0, 1\)"):
        setup("grpo", clip_eps=1.5)
