"""The EDM score objective: loss, single compilation, sharding invariance, bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives, sharding
from fdistill.objectives import score
from tests.helpers import tiny_score_config


class DSMLoss(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_matches_hand_computation_and_exact_denoiser_is_better(self):
        obj = objectives.build(tiny_score_config())
        state, _ = obj.init(jax.random.PRNGKey(0))
        x0 = jnp.asarray(obj.source.reference(256))
        sigma = jnp.exp(jax.random.normal(jax.random.PRNGKey(1), (256,)))
        noise = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
        loss = self.variant(lambda p: score.edm_dsm_loss(obj.denoiser, p, x0, sigma, noise))(state.params)
        chex.assert_shape(loss, (256,))
        # By hand: the zero-initialised output layer gives D = c_skip x.
        c_skip = 0.25 / (sigma**2 + 0.25)
        xt = x0 + sigma[:, None] * noise
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        by_hand = lam * jnp.mean((c_skip[:, None] * xt - x0) ** 2, axis=1)
        np.testing.assert_allclose(loss, by_hand, rtol=1e-4)
        # The exact posterior mean has lower expected loss than the untrained network.
        exact = lam * jnp.mean((obj.source.gmm.denoise(xt, sigma) - x0) ** 2, axis=1)
        assert float(exact.mean()) < float(loss.mean())


def test_step_compiles_once_and_lowers_the_loss():
    obj = objectives.build(tiny_score_config())
    state, frozen = obj.init(jax.random.PRNGKey(0))
    step = jax.jit(chex.assert_max_traces(obj.train_step, n=1))
    losses = []
    for i in range(60):
        state, m = step(state, frozen, jax.tree.map(jnp.asarray, obj.batch(i)))
        losses.append(float(m["loss"]))
    assert int(state.step) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    chex.clear_trace_counter()


def test_one_and_eight_devices_follow_the_same_trajectory():
    assert jax.device_count() == 8
    cfg = tiny_score_config()
    results = {}
    for n in (1, 8):
        obj = objectives.build(cfg)
        mesh = sharding.make_mesh(n)
        repl = sharding.replicated(mesh)
        state, frozen = obj.init(jax.random.PRNGKey(0))
        state = sharding.replicate(state, mesh)
        step = jax.jit(obj.train_step, in_shardings=(repl, repl, sharding.batch_sharding(mesh)),
                       out_shardings=(repl, repl), donate_argnums=(0,))
        losses = []
        for i in range(15):
            state, m = step(state, frozen, sharding.shard_batch(obj.batch(i), mesh))
            losses.append(float(m["loss"]))
        results[n] = (np.array(losses), sharding.to_host(state.params))
    np.testing.assert_allclose(results[1][0], results[8][0], rtol=1e-5)
    chex.assert_trees_all_close(results[1][1], results[8][1], rtol=1e-4, atol=1e-6)


def test_batches_depend_on_step_only():
    obj = objectives.build(tiny_score_config())
    full = obj.batch(7)["x"]
    parts = [obj.batch(7, i, 4)["x"] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), full)
    assert not np.array_equal(obj.batch(8)["x"], full)


def test_unknown_names_list_the_allowed_values():
    cfg = tiny_score_config()
    cfg.model.name = "resnet"
    with pytest.raises(ValueError, match="config.model.name='resnet'.*mlp"):
        objectives.build(cfg)
    cfg = tiny_score_config()
    cfg.objective = "nope"
    with pytest.raises(ValueError, match="config.objective='nope'.*score"):
        objectives.build(cfg)
    cfg = tiny_score_config()
    cfg.eval.sampler = "ddpm"
    with pytest.raises(ValueError, match="config.eval.sampler='ddpm'.*heun"):
        objectives.build(cfg)
    cfg = tiny_score_config()
    cfg.data.name = "cifar"
    with pytest.raises(ValueError, match="config.data.name='cifar'.*gmm"):
        objectives.build(cfg)
