"""Mixed precision and gradient accumulation."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives, sharding
from fdistill.train_state import value_and_grad as accumulated_value_and_grad
from tests.helpers import tiny_score_config


def test_accumulating_k_micro_batches_equals_one_large_batch():
    def loss_fn(w, inputs):
        return jnp.mean((inputs["x"] @ w - inputs["y"]) ** 2)

    key = jax.random.PRNGKey(0)
    inputs = {"x": jax.random.normal(key, (64, 5)), "y": jax.random.normal(jax.random.fold_in(key, 1), (64,))}
    w = jnp.arange(5.0)
    full = jax.value_and_grad(loss_fn)(w, inputs)
    for k in (2, 4, 8):
        chex.assert_trees_all_close(accumulated_value_and_grad(loss_fn, w, inputs, k), full, rtol=1e-5)


def test_score_step_with_accumulation_matches_the_plain_step_on_eight_devices():
    mesh = sharding.make_mesh(8)
    repl = sharding.replicated(mesh)
    out = {}
    for k in (1, 4):
        cfg = tiny_score_config(grad_accum_steps=k)
        obj = objectives.build(cfg)
        state, frozen = obj.init(jax.random.PRNGKey(0))
        state = sharding.replicate(state, mesh)
        step = jax.jit(obj.train_step, in_shardings=(repl, repl, sharding.batch_sharding(mesh)),
                       out_shardings=(repl, repl))
        for i in range(3):
            state, m = step(state, frozen, sharding.shard_batch(obj.batch(i), mesh))
        out[k] = (float(m["loss"]), sharding.to_host(state.params))
    np.testing.assert_allclose(out[1][0], out[4][0], rtol=1e-5)
    chex.assert_trees_all_close(out[1][1], out[4][1], rtol=1e-4, atol=1e-6)


def test_bfloat16_step_runs_stays_finite_and_tracks_float32():
    losses = {}
    for dtype in ("float32", "bfloat16"):
        obj = objectives.build(tiny_score_config(compute_dtype=dtype))
        state, frozen = obj.init(jax.random.PRNGKey(0))
        step = jax.jit(obj.train_step)
        losses[dtype] = []
        for i in range(30):
            state, m = step(state, frozen, jax.tree.map(jnp.asarray, obj.batch(i)))
            losses[dtype].append(float(m["loss"]))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params)), dtype
    assert np.all(np.isfinite(losses["bfloat16"]))
    rel = np.abs(np.array(losses["bfloat16"]) - np.array(losses["float32"])) / np.array(losses["float32"])
    assert rel.mean() < 0.05, rel


def test_bad_precision_and_accumulation_values_name_the_field():
    with pytest.raises(ValueError, match="config.train.compute_dtype='float16'.*float32.*bfloat16"):
        objectives.build(tiny_score_config(compute_dtype="float16"))
    with pytest.raises(ValueError, match="config.train.grad_accum_steps=3"):
        objectives.build(tiny_score_config(grad_accum_steps=3))
