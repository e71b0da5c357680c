"""ECT's continuous-time schedule for consistency training (`cm_schedule='ect'` of
fdistill/objectives/consistency.py): the stages and the mapping r(t) by hand, the loss written out
(target x_0 where r <= sigma_min, ECT's weight), and clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives
from fdistill.objectives import consistency as cm

from tests.test_consistency import tiny, written_out_f


def ect(**distill):
    return tiny("gmm_ct", cm_schedule="ect", **distill)


def test_stages_and_mapping_by_hand():
    assert [int(cm.ect_stage(k, 8000, 8)) for k in (0, 999, 1000, 4500, 7999, 9000)] == [0, 0, 1, 4, 7, 7]
    t = np.array([0.002, 0.05, 0.5, 2.0, 10.0, 80.0])
    for stage in (0, 3, 7):
        n = 1 + 8 / (1 + np.exp(t))  # 1 + k sigmoid(-b t), k = 8, b = 1
        expected = np.maximum(t * (1 - 2.0 ** -(stage + 1) * n), 0.0)
        np.testing.assert_allclose(cm.ect_r(jnp.asarray(t), stage, 2.0, 8.0, 1.0), expected, rtol=1e-5, atol=1e-9)
    # stage 0 clamps small t to r = 0 (denoising); dt / t shrinks by q per stage; r < t always
    r0, r7 = cm.ect_r(jnp.asarray(t), 0, 2.0, 8.0, 1.0), cm.ect_r(jnp.asarray(t), 7, 2.0, 8.0, 1.0)
    assert float(r0[0]) == 0.0 and np.all(np.asarray(r7) < t)
    dt5, dt6 = (t - np.asarray(cm.ect_r(jnp.asarray(t), a, 2.0, 8.0, 1.0)) for a in (5, 6))
    np.testing.assert_allclose(dt6 / dt5, 0.5, rtol=1e-4)


def test_pairs_follow_the_stage():
    c = ect()
    c.train.num_steps = 800
    obj = objectives.build(c)
    assert obj.trajectory_fields == ("train.num_steps",)
    r, t = (np.asarray(v) for v in obj.pair_levels(jnp.int32(0), jax.random.PRNGKey(0), 4096))
    assert np.all((t >= 0.002) & (t <= 80.0)) and np.all(r < t) and np.mean(r == 0) > 0.1
    r7, t7 = (np.asarray(v) for v in obj.pair_levels(jnp.int32(799), jax.random.PRNGKey(0), 4096))
    np.testing.assert_array_equal(t7, t)  # same draw of t, later stage: r much closer to t
    assert np.max((t7 - r7) / t7) < 9 / 256 + 1e-6 and np.mean(r7 == 0) == 0


@pytest.mark.parametrize("loss", ["pseudo_huber", "l2"])
def test_ect_loss_written_out(loss):
    obj = objectives.build(ect(cm_loss=loss))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    x0 = np.asarray(obj.batch(0)["x"][:64])
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(2), x0.shape))
    r, t = (np.asarray(v) for v in obj.pair_levels(jnp.int32(0), jax.random.PRNGKey(3), 64))
    low = r <= 0.002
    assert low.any() and (~low).any()
    pred = written_out_f(obj, state.params, x0 + t[:, None] * z, t)
    r_eval = np.maximum(r, 0.002)
    target = np.where(low[:, None], x0, written_out_f(obj, state.params, x0 + r_eval[:, None] * z, r_eval))
    sq = np.sum((pred - target) ** 2, axis=1)
    c = 0.00054 * np.sqrt(2)
    d = np.sqrt(sq + c**2) - c if loss == "pseudo_huber" else sq / 2
    expected = np.mean(d * (1 / t**2 + 1 / 0.25))
    got = float(obj.loss(state.params, frozen, jnp.asarray(x0), jnp.asarray(z), jnp.asarray(r), jnp.asarray(t)))
    np.testing.assert_allclose(got, expected, rtol=2e-4)


def test_ect_fields_are_checked():
    with pytest.raises(ValueError, match="config.distill.cm_schedule='ect' is consistency training's"):
        objectives.build(tiny("gmm_cd", cm_schedule="ect"))
    with pytest.raises(ValueError, match="cm_ect_q > 1 \\(got 1.0\\)"):
        objectives.build(ect(cm_ect_q=1.0))
    with pytest.raises(ValueError, match="config.distill.cm_schedule='ectt' is not known"):
        objectives.build(tiny("gmm_ct", cm_schedule="ectt"))
