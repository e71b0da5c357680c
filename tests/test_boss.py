"""BOSS (fdistill/objectives/boss.py): the dynamic programme against a planted optimum and brute force,
the step costs against a NumPy double loop, and a short schedule search + straightening run on a
small flow teacher."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives, train
from fdistill.objectives import boss

from tests.helpers import logged_rows, tiny_distill_config
from tests.test_flow import tiny_flow_config


def test_plan_recovers_a_planted_optimum():
    rng = np.random.default_rng(0)
    m, planted = 12, [0, 2, 7, 9, 12]
    cost = rng.uniform(1.0, 2.0, (m + 1, m + 1))
    for j, i in zip(planted[:-1], planted[1:]):
        cost[j, i] = 0.01
    path = np.asarray(boss.plan(jnp.asarray(cost), 4))
    assert path.tolist() == planted


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5])
def test_plan_is_the_brute_force_optimum_with_exactly_n_steps(num_steps):
    rng = np.random.default_rng(num_steps)
    m = 8
    cost = rng.uniform(0.0, 1.0, (m + 1, m + 1)) * (1 + np.arange(m + 1))[None, :]  # favours no structure
    best = min((c for c in itertools.combinations(range(1, m), num_steps - 1)),
               key=lambda c: sum(cost[j, i] for j, i in zip((0,) + c, c + (m,))))
    path = np.asarray(boss.plan(jnp.asarray(cost, jnp.float32), num_steps))
    assert path.tolist() == [0, *best, m]
    assert len(path) == num_steps + 1 and np.all(np.diff(path) > 0)
    with pytest.raises(ValueError, match="step budget 9"):
        boss.plan(jnp.asarray(cost), 9)


def test_step_costs_match_a_double_loop():
    rng = np.random.default_rng(1)
    m, b = 6, 5
    xs, vs = rng.normal(size=(m + 1, b, 3)), rng.normal(size=(m, b, 3))
    times = np.linspace(1, 0, m + 1)
    got = np.asarray(boss.step_costs(jnp.asarray(xs), jnp.asarray(vs), jnp.asarray(times)))
    for j in range(m):
        for i in range(j + 1, m + 1):
            expected = np.mean((xs[i] - xs[j] - (times[i] - times[j]) * vs[j]) ** 2)
            np.testing.assert_allclose(got[j, i], expected, rtol=1e-5)


def test_reference_trajectories_are_heun_steps():
    times = jnp.linspace(1.0, 0.0, 5)
    z = jnp.ones((2, 1))
    xs, vs = boss.reference_trajectories(lambda x, t: -x * t[:, None], z, times)
    x = 1.0
    for k in range(4):
        t, t2 = float(times[k]), float(times[k + 1])
        v = -x * t
        np.testing.assert_allclose(vs[k], v, rtol=1e-6)
        xe = x + (t2 - t) * v
        x = x + (t2 - t) * 0.5 * (v - xe * t2) if t2 > 0 else xe
        np.testing.assert_allclose(xs[k + 1], x, rtol=1e-6)


def test_boss_needs_a_network_teacher():
    c = tiny_distill_config("gmm_boss")
    with pytest.raises(ValueError, match="BOSS straightens a network"):
        objectives.build(c)


def test_schedule_search_and_straightening(tmp_path):
    t = tiny_flow_config(300)
    t.data = tiny_distill_config("gmm_boss").data
    t.train.checkpoint_every, t.train.ema_decay = 300, 0.0
    train.train_and_evaluate(t, str(tmp_path / "flow"), num_devices=1)
    c = tiny_distill_config("gmm_boss", teacher=str(tmp_path / "flow"), num_student_steps=3, boss_fine_steps=30,
                            boss_cost_samples=256, boss_pool_size=1024)
    c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 100, 10, 100
    c.distill.lr_gen = 1e-3
    res = train.train_and_evaluate(c, str(tmp_path / "boss"), num_devices=1)
    times = [res[f"boss_t{k}"] for k in range(4)]
    assert times[0] == 1.0 and times[-1] == 0.0 and np.all(np.diff(times) < 0), times
    assert all(np.isclose(np.asarray(times) * 30, np.round(np.asarray(times) * 30), atol=1e-4))  # on the fine grid
    assert res["nfe"] == 3 and res["uniform/nfe"] == 3 and res["schedule/nfe"] == 3
    rows = logged_rows(tmp_path / "boss", "loss")
    assert rows[-1]["loss"] < rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    # the pool holds the teacher's trajectories at the schedule's times: re-made from the same key
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(c.train.seed))
    k_sched, k_pool, _ = jax.random.split(jax.random.PRNGKey(c.train.seed), 3)
    xs, _, labels = obj.fine_trajectories(frozen["teacher"], jax.random.split(k_pool, 4)[1], 256)
    np.testing.assert_allclose(state.extra["pool"][:, 256:512], xs[state.extra["indices"]], rtol=1e-5, atol=1e-6)
    assert state.extra["pool"].shape == (4, 1024, 2)


def test_every_schedule_shares_one_compiled_sampler(tmp_path):
    """Times travel with the parameters: uniform, BOSS and refined rows run one compiled sampler."""
    t = tiny_flow_config(2)
    t.data = tiny_distill_config("gmm_boss").data
    train.train_and_evaluate(t, str(tmp_path / "flow"), num_devices=1)
    c = tiny_distill_config("gmm_boss", teacher=str(tmp_path / "flow"), num_student_steps=2, boss_fine_steps=10,
                            boss_cost_samples=64, boss_pool_size=128)
    c.eval.chunk = 512
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    for times in (state.extra["times"], jnp.array([1.0, 0.5, 0.0])):
        obj.evaluator.samples({"net": frozen["teacher"], "times": times}, jax.random.PRNGKey(1), 1024)
    assert obj.evaluator._jitted["sample"]._cache_size() == 1
