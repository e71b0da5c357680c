"""The one update path (fdistill/train_state.py): optax AdamW + clipping + EMA + norms, several
networks with their own optimisers, gradient accumulation, and dropout through the step key."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdistill import train_state as ts
from tests.helpers import tiny_score_config


def _params():
    return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.2])}


def test_apply_gradients_is_clipped_adamw_with_ema_and_norms():
    s = ts.OptimizerSettings(learning_rate=0.1, grad_clip=0.5, weight_decay=0.01, ema_decay=0.9)
    opt = ts.Optimizer(s)
    state = ts.create_state(_params(), opt, jax.random.PRNGKey(0))
    grads = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "b": jnp.array([1.0, 1.0])}
    new, metrics = jax.jit(lambda st, g: ts.apply_gradients(st, g, opt))(state, grads)

    # by hand with optax's pieces: clip to global norm 0.5, then AdamW
    norm = np.sqrt(9 + 16 + 1 + 1)
    clipped = jax.tree.map(lambda g: g * 0.5 / norm, grads)
    tx = optax.adamw(0.1, weight_decay=0.01)
    upd, _ = tx.update(clipped, tx.init(_params()), _params())
    expect = optax.apply_updates(_params(), upd)
    chex.assert_trees_all_close(new.params, expect, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(new.ema_params, jax.tree.map(lambda p, e: 0.9 * p + 0.1 * e, _params(), expect),
                                rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["param_norm"]), float(optax.global_norm(expect)), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["update_norm"]), float(optax.global_norm(upd)), rtol=1e-6)
    assert int(new.step) == 0  # the objective advances the step


def test_no_ema_keeps_none_and_eval_params_falls_back():
    opt = ts.Optimizer(ts.OptimizerSettings(learning_rate=0.1))
    state = ts.create_state(_params(), opt, jax.random.PRNGKey(0))
    assert state.ema_params is None
    chex.assert_trees_all_equal(ts.eval_params(state), state.params)


def test_groups_update_only_the_named_networks():
    opts = {"gen": ts.Optimizer(ts.OptimizerSettings(learning_rate=0.1, ema_decay=0.5)),
            "fake": ts.Optimizer(ts.OptimizerSettings(learning_rate=0.2))}
    state = ts.create_state({"gen": _params(), "fake": _params()}, opts, jax.random.PRNGKey(0))
    g = jax.tree.map(jnp.ones_like, _params())
    new, metrics = ts.apply_gradients(state, {"fake": g}, opts)
    chex.assert_trees_all_equal(new.params["gen"], state.params["gen"])
    chex.assert_trees_all_equal(new.opt_state["gen"], state.opt_state["gen"])
    assert set(metrics) == {"grad_norm/fake", "param_norm/fake", "update_norm/fake"}
    # Adam's first step moves every coordinate by the learning rate
    chex.assert_trees_all_close(new.params["fake"], jax.tree.map(lambda p: p - 0.2, _params()), atol=1e-5)
    assert new.ema_params["fake"] is None and new.ema_params["gen"] is not None


def test_settings_from_config_overrides_and_errors():
    c = tiny_score_config().train
    s = ts.OptimizerSettings.from_config(c, learning_rate=None, grad_clip=0.0)
    assert s.learning_rate == c.learning_rate and s.grad_clip == 0.0
    c.warmup_steps = 5  # an optimiser stepping 3 times per training step: its schedule counts training steps
    s3 = ts.OptimizerSettings.from_config(c, updates_per_step=3)
    assert (s3.num_steps, s3.warmup_steps) == (3 * c.num_steps, 15)
    for bad in ({"learning_rate": 0.0}, {"ema_decay": 1.0}, {"grad_clip": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ts.OptimizerSettings.from_config(c, **bad)
    with pytest.raises(ValueError, match="grad_accum_steps=3 must be >= 1 and divide"):
        ts.check_grad_accum(3, 64)


def test_value_and_grad_over_micro_batches_equals_full_batch():
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 3))
    loss = lambda w, x: (jnp.mean((x @ w) ** 2), {"m": jnp.mean(x)})  # noqa: E731
    w = jnp.array([1.0, -1.0, 0.5])
    full = jax.value_and_grad(loss, has_aux=True)(w, x)
    chex.assert_trees_all_close(ts.value_and_grad(loss, w, x, num_micro=4, has_aux=True), full, rtol=1e-5)


def test_dropout_reaches_the_network_through_the_step_key(tmp_path):
    """model.dropout > 0: the score loss depends on the dropout key (so dropout runs in training), and
    equals the deterministic loss when dropout is 0; a short run trains and evaluates."""
    from fdistill import objectives, train

    for name in ("mlp",):
        c = tiny_score_config(2)
        c.model.dropout = 0.5
        obj = objectives.build(c)
        state, _ = obj.init(jax.random.PRNGKey(0))
        # the output layer starts at zero (F = 0 whatever dropout does): perturb every parameter
        leaves, tree = jax.tree.flatten(state.params)
        keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
        state = state.replace(params=jax.tree.unflatten(
            tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
        inputs = obj.noised_inputs({"x": jnp.asarray(obj.batch(0)["x"])}, jax.random.PRNGKey(1))
        l1 = obj.loss(state.params, inputs, ts.dropout_rngs(jax.random.PRNGKey(2)))
        l2 = obj.loss(state.params, inputs, ts.dropout_rngs(jax.random.PRNGKey(3)))
        l_eval = obj.loss(state.params, inputs)
        assert float(l1) != float(l2) and float(l1) != float(l_eval), name
        c.model.dropout = 0.0
        plain = objectives.build(c)
        np.testing.assert_allclose(float(plain.loss(state.params, inputs)), float(l_eval), rtol=1e-6)
    c = tiny_score_config(4)
    c.model.dropout = 0.2
    assert np.isfinite(train.train_and_evaluate(c, str(tmp_path), num_devices=1)["mmd"])
