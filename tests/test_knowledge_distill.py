"""Knowledge distillation ('kd', fdistill/objectives/knowledge_distill.py): the loss is the MSE to the
teacher's Heun endpoint written out by hand, and a short run learns the teacher's map."""
import jax
import jax.numpy as jnp
import numpy as np

from fdistill import objectives, train
from fdistill.configs import load as load_config


def tiny_kd(num_steps=4):
    c = load_config("gmm_kd")
    c.model.width, c.model.depth, c.model.emb_dim = 32, 1, 16
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = num_steps, 64, 1, 0
    c.eval.num_steps = 4
    return c


def test_loss_is_the_mse_to_the_teachers_heun_endpoint():
    obj = objectives.build(tiny_kd())
    state, frozen = obj.init(jax.random.PRNGKey(0))
    z = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
    gmm = frozen["teacher"]
    # EDM Algorithm 1 (Heun, 4 steps on the Karras grid), written out
    r = 1 / 7
    s = [(80**r + i / 3 * (0.002**r - 80**r)) ** 7 for i in range(4)] + [0.0]
    x = 80.0 * np.asarray(z)
    for i in range(4):
        d = (x - np.asarray(gmm.denoise(jnp.asarray(x), jnp.full((64,), s[i])))) / s[i]
        x_e = x + (s[i + 1] - s[i]) * d
        if s[i + 1] > 0:
            d2 = (x_e - np.asarray(gmm.denoise(jnp.asarray(x_e), jnp.full((64,), s[i + 1])))) / s[i + 1]
            x_e = x + (s[i + 1] - s[i]) * 0.5 * (d + d2)
        x = x_e
    g = np.asarray(obj.student.sample(state.params, z))
    np.testing.assert_allclose(float(obj.loss(state.params, frozen, z, None)), np.mean((g - x) ** 2), rtol=1e-4)


def test_short_run_learns_the_teachers_map(tmp_path):
    c = tiny_kd(300)
    c.model.width, c.model.depth = 64, 2
    c.eval.num_steps = 18  # targets from a good teacher sampler (4 Heun steps are not)
    res = train.train_and_evaluate(c, str(tmp_path), num_devices=1)
    rows = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert res["nfe"] == 1 and res["mode_coverage"] == 1.0 and res["mode_weight_tv"] < 0.05, res
