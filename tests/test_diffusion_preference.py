"""Diffusion preference optimisation: denoising errors by hand, rewards, Bradley-Terry pairs, the TFDS
pair dataset, the reference named by its workdir (and made by experiments.prepare), every registry
loss in the objective, and short runs on a tiny GMM teacher (reward rises; 1 and 8 devices agree).
The loss formulas themselves are tested in test_preference_losses.py."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import objectives, train
from fdistill.data import diffusion_preference as prefdata
from fdistill.data import gmm as gmm_lib
from fdistill.objectives import diffusion_preference as dp
from fdistill.objectives import preference as prefloss
from fdistill.objectives import score
from tests.helpers import load_config, tiny_reference_config, tiny_score_config
from tests.named_runs import check_named_run_errors


# ----------------------------------------------------------------------------------------------
# Denoising errors (pixel and perceptual)
# ----------------------------------------------------------------------------------------------
def tiny_denoiser(seed=0):
    cfg = tiny_score_config()
    d = score.build_denoiser(cfg, (2,))

    @jax.jit
    def init(key):
        params = d.init(key, jnp.zeros((1, 2)))
        # Non-zero output layer so D is not just c_skip x.
        return jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), p.shape), params)

    return d, init(jax.random.PRNGKey(seed))


def precond_np(sigma, sigma_data=0.5):
    s2 = sigma**2 + sigma_data**2
    return sigma_data**2 / s2, sigma * sigma_data / np.sqrt(s2), 1 / np.sqrt(s2), np.log(sigma) / 4


def test_pair_errors_share_noise_and_match_hand_computation():
    d, params = tiny_denoiser()
    rng = np.random.default_rng(0)
    x_w, x_l = (jnp.asarray(rng.normal(size=(16, 2)), jnp.float32) for _ in range(2))
    key = jax.random.PRNGKey(3)
    errors = jax.jit(lambda a, b: dp.pair_errors(d, params, params, a, b, dp.pair_noise(key, a, -1.2, 1.2), "pixel"))
    ew, el = errors(x_w, x_l)
    # Identical samples in a pair get identical errors (same sigma, same noise).
    ew2, el2 = errors(x_w, x_w)
    np.testing.assert_array_equal(ew2, el2)
    np.testing.assert_array_equal(ew, ew2)
    # By hand: the same key splits as pair_noise documents.
    k_sigma, k_noise, _, _ = jax.random.split(key, 4)
    sigma = np.asarray(jnp.exp(-1.2 + 1.2 * jax.random.normal(k_sigma, (16,))), np.float64)
    noise = np.asarray(jax.random.normal(k_noise, (16, 2)), np.float64)
    c_skip, c_out, c_in, c_noise = precond_np(sigma)
    net = jax.jit(lambda a, b: d.net.apply({"params": params}, a, b))
    for x, e in ((np.asarray(x_l, np.float64), el), (np.asarray(x_w, np.float64), ew)):
        xt = x + sigma[:, None] * noise
        f = np.asarray(net(jnp.asarray(c_in[:, None] * xt, jnp.float32), jnp.asarray(c_noise, jnp.float32)), np.float64)
        den = c_skip[:, None] * xt + c_out[:, None] * f
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        np.testing.assert_allclose(e, lam * np.mean((den - x) ** 2, 1), rtol=2e-4)


def test_perceptual_errors_use_reference_features_at_a_second_noise_level():
    d, params = tiny_denoiser(0)
    _, ref = tiny_denoiser(5)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    sigma, sigma2 = jnp.asarray(rng.uniform(0.1, 2, 8), jnp.float32), jnp.asarray(rng.uniform(0.1, 2, 8), jnp.float32)
    noise, noise2 = (jnp.asarray(rng.normal(size=(8, 2)), jnp.float32) for _ in range(2))
    err = dp.perceptual_errors(d, params, ref, x, sigma, noise, sigma2, noise2)
    # By hand with the network called directly (features=True returns the last hidden layer).
    x0_hat = d(params, x + sigma[:, None] * noise, sigma)
    _, _, c_in, c_noise = precond_np(np.asarray(sigma2, np.float64))
    feat = lambda y: np.asarray(d.net.apply({"params": ref}, jnp.asarray(c_in[:, None] * np.asarray(y), jnp.float32),
                                            jnp.asarray(c_noise, jnp.float32), features=True)[1], np.float64)
    y_hat = np.asarray(x0_hat) + np.asarray(sigma2)[:, None] * np.asarray(noise2)
    y = np.asarray(x) + np.asarray(sigma2)[:, None] * np.asarray(noise2)
    np.testing.assert_allclose(err, np.mean((feat(y_hat) - feat(y)) ** 2, 1), rtol=1e-4, atol=1e-8)
    # A perfect reconstruction (D -> x as sigma -> 0) has ~zero perceptual error.
    tiny = dp.perceptual_errors(d, params, ref, x, jnp.full((8,), 1e-4), noise, sigma2, noise2)
    assert float(jnp.max(tiny)) < 1e-6 < float(jnp.min(err))


# ----------------------------------------------------------------------------------------------
# Rewards, Bradley-Terry pairs, the TFDS dataset
# ----------------------------------------------------------------------------------------------
def ring():
    c = load_config("gmm_score").data
    return gmm_lib.from_config(c)


def test_half_plane_and_mode_subset_rewards():
    g = ring()
    means = np.asarray(g.means, np.float32)  # angles 0, 45, ..., 315 degrees
    hp = prefdata.HalfPlaneReward(angle_deg=22.5)
    np.testing.assert_allclose(hp(means), np.cos(np.deg2rad(np.arange(8) * 45 - 22.5)), atol=1e-6)
    np.testing.assert_array_equal(hp.preferred(means), [1, 1, 1, 0, 0, 0, 0, 1])
    ms = prefdata.ModeSubsetReward(g, modes=(0, 3), smoothing=0.05)
    np.testing.assert_allclose(ms(means), [1, 0, 0, 1, 0, 0, 0, 0], atol=1e-4)
    np.testing.assert_array_equal(ms.preferred(means + 0.01), [1, 0, 0, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"config.reward.modes"):
        prefdata.ModeSubsetReward(g, modes=(8,))
    m = prefdata.reward_metrics(hp, np.concatenate([means, [[np.nan, 0.0], [5.0, 0.0]]]), "r/", g)
    assert m["r/preferred_frac"] == pytest.approx(5 / 10)  # 4 modes + the far point; NaN counts as 0
    assert m["r/preferred_on_data_frac"] == pytest.approx(4 / 10)  # the far point is off the data


def test_classifier_reward_is_the_target_log_probability():
    class Clf:  # the DigitsClassifier interface: probs(x) -> [n, 10]
        def probs(self, x):
            logits = np.asarray(x, np.float64).reshape(len(x), -1)[:, :10]
            e = np.exp(logits - logits.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

    x = np.random.default_rng(0).normal(size=(32, 4, 4, 1)).astype(np.float32)
    r = prefdata.ClassifierReward(Clf(), target_class=3)
    logits = x.reshape(32, -1)[:, :10].astype(np.float64)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(r(x), log_p[:, 3], rtol=1e-5)
    np.testing.assert_array_equal(r.preferred(x), logits.argmax(1) == 3)


def test_bradley_terry_labels_follow_the_sigmoid_and_are_seeded():
    rng = np.random.default_rng(0)
    r_a = rng.uniform(-1, 1, 200_000)
    r_b = rng.uniform(-1, 1, 200_000)
    wins, p = prefdata.bradley_terry_labels(r_a, r_b, 0.3, np.random.default_rng(1))
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(r_a - r_b) / 0.3)), rtol=1e-10)
    bins = np.digitize(p, np.linspace(0, 1, 11))
    for b in np.unique(bins):
        sel = bins == b
        se = np.sqrt(p[sel].mean() * (1 - p[sel].mean()) / sel.sum()) + 1e-3
        assert abs(wins[sel].mean() - p[sel].mean()) < 4 * se
    again, _ = prefdata.bradley_terry_labels(r_a, r_b, 0.3, np.random.default_rng(1))
    np.testing.assert_array_equal(wins, again)
    with pytest.raises(ValueError, match="config.pairs.temperature"):
        prefdata.bradley_terry_labels(r_a, r_b, 0.0, np.random.default_rng(1))


def test_pairs_roundtrip_through_tfds_and_bad_records_are_named(tmp_path):
    rng = np.random.default_rng(0)
    x_a, x_b = rng.normal(size=(64, 2)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
    pairs = prefdata.make_pairs(x_a, x_b, prefdata.HalfPlaneReward(0.0), 1e-3, seed=0)
    assert np.all(pairs["reward_w"] >= pairs["reward_l"])  # temperature -> 0: labels follow the reward
    np.testing.assert_allclose(pairs["reward_w"], pairs["x_w"][:, 0], rtol=1e-6)
    prefdata.write_pairs(str(tmp_path), "ok", pairs)
    back = prefdata.read_pairs(str(tmp_path), "ok", (2,), num_pairs=64)
    for k in prefdata.FIELDS:
        np.testing.assert_array_equal(back[k], pairs[k], err_msg=k)
    with pytest.raises(ValueError, match="holds 64 pairs, expected config.pairs.num_pairs=65"):
        prefdata.read_pairs(str(tmp_path), "ok", (2,), num_pairs=65)
    with pytest.raises(FileNotFoundError, match="no prepared preference-pair dataset 'missing'"):
        prefdata.read_pairs(str(tmp_path), "missing", (2,))
    bad = {k: v.copy() for k, v in pairs.items()}
    bad["x_l"][7, 1] = np.nan
    prefdata.write_pairs(str(tmp_path), "bad", bad)
    with pytest.raises(ValueError, match=r"record \d+ field 'x_l' is not finite"):
        prefdata.read_pairs(str(tmp_path), "bad", (2,))
    # Batches depend only on (seed, step): two processes' halves make up the one-process batch.
    ps = prefdata.PairSet(back, seed=3)
    full = ps.batch(5, 16)
    halves = [ps.batch(5, 16, i, 2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["x_w"] for h in halves]), full["x_w"])
    with pytest.raises(ValueError, match="config.train.batch_size=128 exceeds the 64 stored pairs"):
        ps.batch(0, 128)


# ----------------------------------------------------------------------------------------------
# The objective on a tiny trained teacher
# ----------------------------------------------------------------------------------------------
def po_config(reference, method="diffusion_dpo", steps=10, lr=1e-4, **dpo):
    c = load_config("gmm_mapo" if method == "mapo" else "gmm_diffusion_dpo")
    c.dpo.reference = reference
    c.dpo.method = method
    c.model = tiny_reference_config().model  # the reference's network
    for k, v in dpo.items():
        c.dpo[k] = v
    c.pairs.num_pairs = 1024
    c.train.num_steps = steps
    c.train.learning_rate = lr
    c.train.batch_size = 64
    c.train.log_every = 1
    c.train.checkpoint_every = steps
    c.eval.num_samples = 1024
    c.eval.chunk = 1024
    c.eval.num_steps = 8
    return c


def test_bad_config_values_name_the_field(score_run_dir):
    names = str(list(prefloss.LOSSES) + ["diffusion_dpo"]).replace("[", r"\[").replace("]", r"\]")
    for field, value, match in (("method", "ppo", r"config.dpo.method='ppo' is not a known preference loss; allowed: "
                                 + names),
                                ("space", "clip", r"config.dpo.space='clip' is not known; allowed: \['pixel'"),
                                ("beta", -1.0, r"config.dpo.beta must be > 0"),
                                ("label_smoothing", 0.5, r"config.dpo.label_smoothing must be in \[0, 0.5\)")):
        c = po_config(score_run_dir, method="cdpo")
        c.dpo[field] = value
        with pytest.raises(ValueError, match=match):
            objectives.build(c)
    c = po_config(score_run_dir)
    c.reward.kind = "aesthetic"
    with pytest.raises(ValueError, match=r"config.reward.kind='aesthetic' is not known"):
        objectives.build(c)


def test_reference_is_a_named_finished_run(score_run_dir, tmp_path):
    check_named_run_errors(lambda wd: objectives.build(po_config(wd)), "dpo.reference", "gmm_score",
                           tiny_reference_config(), tmp_path)
    c = po_config(score_run_dir)
    c.model.width = 32
    with pytest.raises(ValueError, match=r"config.dpo.reference='.*' was made with other data/model/diffusion "
                                         r"settings: config.model.width=32 \(run: 64\)"):
        objectives.build(c)


def test_prepare_trains_the_missing_reference_once_into_the_named_workdir(tmp_path, monkeypatch):
    from experiments import prepare

    make = prepare.dependency_config

    def cheaper(config, step, num_steps=0):  # gmm_score.py with a small batch and evaluation
        c = make(config, step, num_steps)
        c.train.batch_size, c.eval.num_samples, c.eval.chunk, c.eval.num_steps = 64, 256, 256, 4
        return c

    monkeypatch.setattr(prepare, "dependency_config", cheaper)
    c = po_config("")
    c.pairs.num_pairs = 128
    assert [(s.field, s.make_with, s.finished) for s in prepare.plan(c, str(tmp_path))] == [
        ("dpo.reference", "gmm_score", False)]
    empty = prepare.prepare(c, str(tmp_path), num_steps=20)
    ref = str(tmp_path / "reference")
    assert empty == {"dpo.reference": ref}
    with open(os.path.join(ref, "config.json")) as f:  # gmm_score.py with this config's network
        assert json.load(f)["model"] == c.model.to_dict()
    results = os.path.join(ref, "results.json")
    stamp = os.path.getmtime(results)
    c.dpo.reference = ref
    assert prepare.prepare(c, str(tmp_path), num_steps=20) == {}  # finished: kept, not retrained
    assert os.path.getmtime(results) == stamp
    assert objectives.build(c).pairs.num_pairs == 128
    # the other fields that name runs: an SFT policy, a teacher (by data source)
    from fdistill import configs

    distill = configs.base("distill", data="digits", model="unet")
    distill.distill.teacher = str(tmp_path / "teacher")
    sft = load_config("synthetic_dpo")
    sft.po.sft_workdir = ""
    assert [(s.field, s.make_with, s.workdir) for p in (distill, sft) for s in prepare.plan(p, "W")] == [
        ("distill.teacher", "digits_score", str(tmp_path / "teacher")), ("po.sft_workdir", "synthetic_sft", "W/sft")]
    sft.po.reference = "init"
    assert prepare.plan(sft, "W") == []
    # the follow-up command: prepare's own flags dropped, the empty field named
    argv = ["--config", "ml_collections_configs/gmm_mapo.py", "--workdir=W", "--steps", "20", "--config.dpo.reference=",
            "--dry_run", "--config.dpo.beta=0.5"]
    assert prepare.run_command(argv, {"dpo.reference": "W/reference"}) == (
        "python -m experiments.run --config ml_collections_configs/gmm_mapo.py --workdir=W --config.dpo.beta=0.5 "
        "--config.dpo.reference=W/reference")


@pytest.mark.parametrize("method,space", [("diffusion_dpo", "perceptual"), ("ipo", "pixel"), ("aot", "pixel"),
                                          ("cpo", "pixel")])
def test_step_compiles_once_and_only_the_policy_moves(score_run_dir, method, space):
    """Any registry loss is a `config.dpo.method` (on -err/2, lengths 1), here ones named after
    language losses (ipo; aot, which sorts over the batch; cpo, reference-free with an NLL term);
    MaPO, reference-free, runs in test_short_mapo_run_*."""
    obj = objectives.build(po_config(score_run_dir, method, space=space))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    ref_before = jax.tree.map(np.asarray, frozen["ref"])
    step = jax.jit(chex.assert_max_traces(obj.train_step, n=1))
    history = []
    for i in range(3):
        state, m = step(state, frozen, jax.tree.map(jnp.asarray, obj.batch(i)))
        history.append(m)
    assert np.isfinite(float(m["loss"])) and int(state.step) == 3
    for k in ("grad_norm", "param_norm", "update_norm", "rewards/chosen", "rewards/margins", "logps/chosen", "err_w"):
        assert np.isfinite(float(m[k])), k  # the shared update path's and the registry's metrics
    np.testing.assert_allclose(m["logps/chosen"], -0.5 * m["err_w"], rtol=1e-6)
    # step 1: policy == reference, so every log-ratio margin h is 0 (up to float rounding)
    at_zero = {"diffusion_dpo": np.log(2.0), "ipo": (1 / (2 * obj.beta)) ** 2, "aot": np.log(2.0)}.get(method)
    if at_zero is not None:
        np.testing.assert_allclose(history[0]["loss"], at_zero, rtol=1e-3)
    chex.assert_trees_all_equal(frozen["ref"], ref_before)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, frozen["ref"])
    assert max(jax.tree.leaves(moved)) > 0
    chex.clear_trace_counter()


def test_short_dpo_run_raises_the_mean_reward(score_run_dir, tmp_path):
    res = train.train_and_evaluate(po_config(score_run_dir, steps=150, lr=1e-3, beta=20.0), str(tmp_path))
    for k in ("reward_mean", "preferred_frac", "mmd_to_reference", "reference/reward_mean", "sample/mode_coverage",
              "reference/preferred_frac", "sample/mmd", "preferred_on_data_frac"):
        assert k in res, k
    assert res["reward_mean"] > res["reference/reward_mean"] + 0.05, res
    assert res["preferred_frac"] > res["reference/preferred_frac"], res
    assert res["mmd_to_reference"] > 0
    assert os.listdir(os.path.join(str(tmp_path), "plots"))
    # The pairs dataset was written next to the reference and is reused.
    assert os.path.isdir(os.path.join(score_run_dir, "preference_pairs", "diffusion_preference_pairs"))


def test_short_mapo_run_raises_the_mean_reward(score_run_dir, tmp_path):
    res = train.train_and_evaluate(po_config(score_run_dir, "mapo", steps=150, lr=3e-4), str(tmp_path))
    assert res["reward_mean"] > res["reference/reward_mean"] + 0.05, res


def test_one_and_eight_devices_agree(score_run_dir, tmp_path):
    """Also gradient accumulation: 8 devices with 2 micro-batches of 32 pairs follow the 1-device run,
    as sigma and the noise are drawn once for the whole batch."""
    losses = {}
    for n in (1, 8):
        wd = str(tmp_path / str(n))
        c = po_config(score_run_dir, steps=6)
        c.train.grad_accum_steps = 1 if n == 1 else 2
        c.eval.num_samples = c.eval.chunk = 256
        train.train_and_evaluate(c, wd, num_devices=n)
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            losses[n] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses[1]) == 6
    # beta / 2 = 50 amplifies float32 reduction-order differences of the errors (~1e-7) to ~5e-6.
    np.testing.assert_allclose(losses[1], losses[8], rtol=1e-4)
