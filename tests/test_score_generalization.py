"""A fixed finite training set for the analytic mixture (`config.data.num_train`,
`fdistill/data/gmm_source.py`) and the score-generalization study built on it
(`experiments/studies/score_generalization.py`)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.studies import score_generalization as study
from fdistill import configs, objectives, train, workdir
from fdistill import data as data_lib
from fdistill.denoiser import denoiser_errors
from tests.helpers import tiny_score_config


def gmm_data(**fields):
    c = configs.data("gmm")
    for k, v in fields.items():
        c[k] = v
    return c


def test_num_train_zero_keeps_the_fresh_sample_batches():
    default, explicit = data_lib.build(gmm_data(seed=3)), data_lib.build(gmm_data(seed=3, num_train=0))
    assert default.num_train == 0 and default.train_points is None
    for step in (0, 1, 57):
        # today's batch: fresh exact samples drawn with the stream [seed, 1, step]
        today = default.gmm.sample_numpy(np.random.default_rng([3, 1, step]), 64)
        np.testing.assert_array_equal(default.batch(step, 64)["x"], today)
        np.testing.assert_array_equal(explicit.batch(step, 64)["x"], today)


def test_a_fixed_training_set_gives_batches_of_its_rows_deterministic_and_split_across_processes():
    src = data_lib.build(gmm_data(num_train=100, seed=1))
    pts = src.train_points
    assert pts.shape == (100, 2) and pts.dtype == np.float32
    np.testing.assert_array_equal(data_lib.build(gmm_data(num_train=100, seed=1)).train_points, pts)
    assert not np.allclose(data_lib.build(gmm_data(num_train=100, seed=2)).train_points, pts)
    assert not np.allclose(src.reference(100), pts)  # another stream than the evaluation's points
    seen = set()
    for step in range(40):
        x = src.batch(step, 64)["x"]
        rows = [np.flatnonzero((pts == r).all(1)) for r in x]
        assert all(len(i) == 1 for i in rows), f"step {step}: a batch row is not a training point"
        seen.update(int(i[0]) for i in rows)
        np.testing.assert_array_equal(src.batch(step, 64)["x"], x)  # deterministic in (seed, step)
        halves = [src.batch(step, 64, process_index=p, process_count=2)["x"] for p in (0, 1)]
        np.testing.assert_array_equal(np.concatenate(halves), x)
    assert not np.array_equal(src.batch(0, 64)["x"], src.batch(1, 64)["x"])
    assert len(seen) > 95  # 2560 draws with replacement reach (almost surely) all 100 points


def test_a_negative_num_train_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"config\.data\.num_train=-5 must be an integer >= 0"):
        data_lib.build(gmm_data(num_train=-5))
    assert workdir.kind_of("data.num_train") == "fixed"  # a resumed run must keep it


def test_study_error_helpers_match_the_loops_evaluation_and_the_empirical_denoiser():
    c = tiny_score_config()
    objective = objectives.build(c)
    params = objective.init_state(jax.random.PRNGKey(0), None).params
    key = study.eval_key(c)
    loop = denoiser_errors(objective.denoiser, params, objective.source, key, sigmas=study.SIGMAS)
    mine = study.fit_errors(lambda x, s: objective.denoiser(params, x, s),
                            objective.source.reference(4096, seed=777), objective.source.gmm, key)
    for s in study.SIGMAS:
        assert mine[f"rel_mse/sigma_{s:g}"] == pytest.approx(loop[f"denoiser_rel_mse/sigma_{s:g}"], rel=1e-4)
        # on fresh points the excess estimates the same quantity (D* is the conditional mean)
        assert mine[f"excess/sigma_{s:g}"] == pytest.approx(mine[f"rel_mse/sigma_{s:g}"], abs=0.1)

    y = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    x = jnp.array([[0.9, 0.1], [0.1, 1.8], [0.3, 0.3]])
    d = study.empirical_denoiser(y, chunk=2)
    np.testing.assert_allclose(d(x, jnp.full((3,), 1e-2)), y[[1, 2, 0]], atol=1e-5)  # nearest training point
    np.testing.assert_allclose(d(x, jnp.full((3,), 1e3)), np.broadcast_to(y.mean(0), (3, 2)), atol=1e-4)
    sig = jnp.array([0.5, 0.7, 1.1])
    w = jax.nn.softmax(-((x[:, None] - y[None]) ** 2).sum(-1) / (2 * sig[:, None] ** 2), axis=-1)
    np.testing.assert_allclose(d(x, sig), w @ y, rtol=1e-5, atol=1e-6)


def test_the_study_writes_a_table_with_a_row_per_size_and_sigma_and_reuses_finished_runs(tmp_path):
    base = tiny_score_config()
    base.train.batch_size = 32
    wd = str(tmp_path / "study")
    out = study.run_study(base, wd, [64, 0], num_steps=20, num_evals=2)
    assert list(out["rows"]) == ["n64", "fresh"]
    for s in study.SIGMAS:
        k = f"sigma_{s:g}"
        assert {f"final/{k}", f"best/{k}", f"train_rel_mse/{k}", f"train_excess/{k}"} <= set(out["rows"]["n64"])
        assert f"train_excess/{k}" not in out["rows"]["fresh"]
        assert k in out["memorising_reference"]["n64"] and not out["memorising_reference"]["fresh"]
        assert out["rows"]["n64"][f"best/{k}"]["mean"] <= out["rows"]["n64"][f"final/{k}"]["mean"]
    # the loop's evaluation rows every 10 steps, training-set errors from the kept checkpoints
    assert [r["step"] for r in out["curves"]["n64"][0]] == [10, 20]
    assert all("train_excess/sigma_0.02" in r for r in out["curves"]["n64"][0])
    results = json.load(open(os.path.join(wd, "n64", "seed_0", "results.json")))
    assert out["curves"]["n64"][0][-1]["fresh/sigma_0.2"] == results["denoiser_rel_mse/sigma_0.2"]

    table = open(os.path.join(wd, "table.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| 64 |") or line.startswith("| fresh (inf) |")]
    assert len(rows) == 2 * len(study.SIGMAS) + 2  # the error table, and the sample-metrics table
    assert os.path.getsize(os.path.join(wd, "curves.png")) > 0
    assert json.load(open(os.path.join(wd, "table.json")))["meta"]["sizes"] == [64, 0]

    # re-running reuses the finished runs; resuming with another training-set size is refused
    again = study.run_study(base, wd, [64], num_steps=20, num_evals=2)
    assert again["rows"]["n64"] == out["rows"]["n64"]
    other = study.size_config(base, 128, 0, 20, 2)
    with pytest.raises(workdir.ConfigMismatch, match=r"config\.data\.num_train: 64 in config.json, 128 now"):
        train.train_and_evaluate(other, os.path.join(wd, "n64", "seed_0"))
