"""Digits data (TFDS builder, pipeline, resume), the classifier metrics, the generic TFDS source, and a
tiny U-Net teacher and one-step student running a few steps on 8 devices."""
import os

import jax
import ml_collections
import numpy as np
import pytest

from fdistill import checkpoint, train
from fdistill import data as data_lib
from fdistill.configs import load as load_config
from fdistill.data import digits, images
from fdistill.evaluation import digits_classifier
from tests.helpers import logged_rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fresh data_dir holding the built dataset and a quickly trained (cached) classifier."""
    d = str(tmp_path_factory.mktemp("digits_data"))
    src = digits.make_source(ml_collections.ConfigDict({"name": "digits", "data_dir": d}))
    params, info = digits_classifier.train_classifier(src.split("train"), src.split("test"), steps=200)
    assert info["test_accuracy"] > 0.9, info
    digits_classifier.save(digits_classifier.cache_path(d, 8), params, info)
    return d


def data_config(data_dir, **kw):
    return ml_collections.ConfigDict({"name": "digits", "data_dir": data_dir, "resolution": 8, "seed": 0, **kw})


def test_builder_shapes_splits_and_determinism(tmp_path):
    from sklearn.datasets import load_digits

    arrays = []
    for name in ("a", "b"):
        d = str(tmp_path / name)
        arrays.append({s: digits.load_split(d, s) for s in ("train", "test")})
        files = os.listdir(os.path.join(d, "fdistill_digits", "1.0.0"))
        assert any(f.startswith("fdistill_digits-train.array_record") for f in files), files
    for split, n in (("train", 1500), ("test", 297)):
        x, y = arrays[0][split]
        assert x.shape == (n, 8, 8, 1) and x.dtype == np.float32 and y.shape == (n,) and y.dtype == np.int32
        assert x.min() == -1.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))
        np.testing.assert_array_equal(x, arrays[1][split][0])  # built twice: identical
        np.testing.assert_array_equal(y, arrays[1][split][1])
    # The records are scikit-learn's digits, value v -> v / 8 - 1, split by a fixed permutation.
    ref = load_digits()
    idx = digits._split_indices()
    assert len(np.intersect1d(idx["train"], idx["test"])) == 0 and len(idx["train"]) + len(idx["test"]) == 1797
    np.testing.assert_array_equal(arrays[0]["test"][0][..., 0], ref.images[idx["test"]] / 8.0 - 1.0)
    np.testing.assert_array_equal(arrays[0]["test"][1], ref.target[idx["test"]])


def test_concurrent_builds_in_one_data_dir(tmp_path):
    """Processes started together (a multi-process run) build the dataset once, none fails."""
    import subprocess
    import sys

    code = ("import sys; from fdistill.data import digits; "
            "x, y = digits.load_split(sys.argv[1], 'test'); print(x.shape[0], int(y.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    last = {out.strip().splitlines()[-1] for out, _ in outs}  # the builder also prints its progress
    assert len(last) == 1 and last.pop().split()[0] == "297"


def test_source_shapes_and_bad_resolution(data_dir):
    for res in (8, 16):
        src = data_lib.build(data_config(data_dir, resolution=res))
        assert src.shape == (res, res, 1) and src.num_classes == 10
        b = src.batch(0, 32)
        assert b["x"].shape == (32, res, res, 1) and b["label"].shape == (32,)
        assert b["x"].min() >= -1.0 and b["x"].max() <= 1.0
    with pytest.raises(ValueError, match="config.data.resolution"):
        data_lib.build(data_config(data_dir, resolution=12))


def test_pipeline_is_a_function_of_seed_and_step(data_dir):
    a, b = data_lib.build(data_config(data_dir)), data_lib.build(data_config(data_dir))
    for step in (0, 7, 30):  # 30 * 64 crosses the first epoch boundary (1500 examples)
        ga = a.batch(step, 64)
        np.testing.assert_array_equal(ga["x"], b.batch(step, 64)["x"])
        # Process slices of the global batch concatenate to it.
        parts = [a.batch(step, 64, p, 4) for p in range(4)]
        np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), ga["x"])
        np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), ga["label"])
    # One epoch (25 steps of 60) visits every example exactly once; the next epoch is reshuffled.
    sh = images.EpochShuffler(1500, seed=0)
    epoch0 = np.concatenate([sh.indices(s, 60) for s in range(25)])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(1500))
    assert not np.array_equal(sh.indices(25, 60), sh.indices(0, 60))
    assert not np.array_equal(images.EpochShuffler(1500, seed=1).indices(0, 60), sh.indices(0, 60))


def test_classifier_metrics_on_real_and_bad_samples(data_dir):
    src = data_lib.build(data_config(data_dir))
    clf = src.classifier
    assert clf.info["steps"] == 200  # loaded from the cache, not retrained
    x_te, y_te = src.split("test")
    assert clf.accuracy(x_te, y_te) == pytest.approx(clf.test_accuracy)
    real = src.evaluate_samples(x_te, labels=y_te)
    assert real["class_entropy"] > 2.2 and real["precision"] > 0.8 and real["label_accuracy"] > 0.9
    blobs = np.random.default_rng(0).uniform(-1, 1, size=(512, 8, 8, 1)).astype(np.float32)
    noise = src.evaluate_samples(blobs)
    assert noise["fd_digits"] > 3 * real["fd_digits"] and noise["precision"] < real["precision"]
    assert "fd_digits_inf" not in real  # 297 test digits < 20 x 64 feature dimensions
    one_class = src.evaluate_samples(x_te[y_te == 3])
    assert one_class["class_entropy"] < 0.5 and one_class["recall"] < real["recall"]
    assert real["class_tv"] < 0.15 and one_class["class_tv"] > 0.85  # one class: 1 - its frequency (~0.1)
    nan = src.evaluate_samples(np.concatenate([x_te[:8], np.full((8, 8, 8, 1), np.nan, np.float32)]))
    assert nan["nonfinite_frac"] == 0.5


@pytest.mark.slow
def test_classifier_reaches_97_percent(data_dir):
    src = data_lib.build(data_config(data_dir))
    _, info = digits_classifier.train_classifier(src.split("train"), src.split("test"))
    assert info["test_accuracy"] >= 0.97, info


def test_generic_tfds_source(data_dir, tmp_path):
    src = data_lib.build(ml_collections.ConfigDict({"name": "tfds:fdistill_digits", "data_dir": data_dir}))
    assert src.shape == (8, 8, 1) and src.num_classes == 10 and src.feature_name == "pixels"
    b = src.batch(3, 32, 1, 2)
    assert b["x"].shape == (16, 8, 8, 1) and b["x"].dtype == np.float32 and b["label"].dtype == np.int32
    np.testing.assert_array_equal(src.batch(3, 32)["x"][16:], b["x"])
    # One epoch holds exactly the train split (in the data source's own record order).
    x = np.concatenate([src.batch(s, 100)["x"] for s in range(15)])
    ref, _ = digits.load_split(data_dir, "train")
    key = lambda a: a.reshape(len(a), -1)[np.lexsort(a.reshape(len(a), -1).T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(x), key(ref))
    m = src.evaluate_samples(ref[:500])
    assert set(m) >= {"fd_pixels", "precision", "recall"} and m["fd_pixels"] < 1.0
    with pytest.raises(FileNotFoundError, match="allow_download"):
        data_lib.build(ml_collections.ConfigDict({"name": "tfds:mnist", "data_dir": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
        data_lib.build(ml_collections.ConfigDict({"name": "tfds:no_such_dataset_xyz", "data_dir": str(tmp_path)}))
    with pytest.raises(ValueError, match="image_key"):
        data_lib.build(ml_collections.ConfigDict({"name": "tfds:fdistill_digits", "data_dir": data_dir,
                                                  "image_key": "img"}))


# ----- tiny teacher and student on 8 devices ---------------------------------------------------------


def tiny_teacher_config(data_dir, num_steps):
    c = load_config("digits_score")
    c.data.data_dir = data_dir
    c.model.channels = 8
    c.model.num_res_blocks = 1
    c.model.emb_dim = 16
    c.model.attention = False  # covered by tests/test_unet.py; keeps compilation short
    c.train.num_steps = num_steps
    c.train.batch_size = 16
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 3
    c.eval.num_samples = 64
    c.eval.num_steps = 2
    c.eval.chunk = 64
    return c


def losses(workdir):
    return {r["step"]: r["loss"] for r in logged_rows(workdir, "loss")}


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    assert len(jax.devices()) == 8
    results = train.train_and_evaluate(tiny_teacher_config(data_dir, 6), workdir)
    assert results["step"] == 6
    for k in ("fd_digits", "precision", "recall", "class_entropy", "samples_per_sec"):
        assert np.isfinite(results[k]), k
    assert any(f.endswith(".png") for f in os.listdir(os.path.join(workdir, "plots")))
    return workdir


def test_pipeline_resumes_at_the_same_batch_after_a_restore(data_dir, teacher_dir, tmp_path):
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(tiny_teacher_config(data_dir, 3), workdir)
    restored_step = int(checkpoint.restore_tree(workdir)["step"])
    assert restored_step == 3
    # The batch a fresh source gives at the restored step is the one an uninterrupted pipeline gives
    # after steps 0, 1, 2.
    running = data_lib.build(data_config(data_dir))
    for s in range(3):
        running.batch(s, 16)
    expect = running.batch(3, 16)
    got = data_lib.build(data_config(data_dir)).batch(restored_step, 16)
    np.testing.assert_array_equal(got["x"], expect["x"])
    np.testing.assert_array_equal(got["label"], expect["label"])
    # Resuming to step 6 reproduces the uninterrupted run's losses (same batches, same state).
    train.train_and_evaluate(tiny_teacher_config(data_dir, 6), workdir)
    straight, resumed = losses(teacher_dir), losses(workdir)
    assert sorted(resumed) == list(range(1, 7))
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [straight[s] for s in range(1, 7)], rtol=1e-5)


def test_tiny_student_runs_on_8_devices(data_dir, teacher_dir, tmp_path):
    c = load_config("digits_fdistill")
    c.data.data_dir = data_dir
    c.distill.teacher = teacher_dir
    c.distill.divergence = "js"
    c.distill.disc_hidden = 16
    c.distill.fake_updates_per_gen = 1
    c.train.num_steps = 2
    c.train.batch_size = 16
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
    c.eval.num_steps = 1
    c.eval.chunk = 1024
    workdir = str(tmp_path / "student")
    results = train.train_and_evaluate(c, workdir)
    assert results["step"] == 2 and results["nfe"] == 1.0
    for k in ("fd_digits", "precision", "recall", "class_entropy", "samples_per_sec", "teacher/fd_digits",
              "speedup"):
        assert np.isfinite(results[k]), k
    assert any(f.endswith(".png") for f in os.listdir(os.path.join(workdir, "plots")))
    rows = logged_rows(workdir)
    assert all(np.isfinite(r["loss"]) and "disc/accuracy" in r for r in rows if "loss" in r)


def test_tiny_find_runs_on_8_devices(data_dir, teacher_dir, tmp_path):
    """FIND on a digits score run with the classifier reward, whose jittable form (the classifier's
    weights an argument of the step) equals the chunked NumPy one."""
    from fdistill import objectives

    c = load_config("digits_find")
    c.data.data_dir = data_dir
    c.rl.sampler = teacher_dir
    c.rl.sampler_steps = 2
    c.model = tiny_teacher_config(data_dir, 1).model
    c.train.num_steps = 3
    c.train.batch_size = 16
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.eval.num_samples = c.eval.chunk = 64
    obj = objectives.build(c)
    x = np.asarray(data_lib.build(data_config(data_dir)).batch(0, 32)["x"])
    np.testing.assert_allclose(jax.jit(obj.reward.value)(obj.reward.frozen(), x), obj.reward(x), rtol=1e-5, atol=1e-5)
    assert obj.latent_shape == (8, 8, 1) and obj.sampler.nfe == 3
    results = train.train_and_evaluate(c, str(tmp_path / "find"))
    assert results["step"] == 3 and results["reward_evals"] == 48
    for k in ("reward_mean", "preferred_frac", "mmd_to_reference", "kl_to_prior", "sample/fd_digits",
              "reference/fd_digits", "reference/reward_mean"):
        assert np.isfinite(results[k]), k
    assert any(f.startswith("samples_") for f in os.listdir(os.path.join(str(tmp_path / "find"), "plots")))


@pytest.mark.parametrize("name", ["digits_cd", "digits_scm"])
def test_digits_consistency_configs_take_one_step(data_dir, teacher_dir, name):
    """The flow/consistency table's digits CD and sCD runs build on a digits score run, start from its
    weights, and take one finite jitted update on the U-Net (CD: a teacher Heun step; sCD: a jax.jvp
    through it). digits_kd and digits_ct differ from them only in objective code the mixture tests cover."""
    from fdistill import objectives

    c = load_config(name)
    c.data.data_dir = data_dir
    c.distill.teacher = teacher_dir
    c.train.batch_size = 8
    c.eval.num_steps = 2
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    teacher = checkpoint.restore_tree(teacher_dir)["ema_params"]
    student = state.params["net"] if name == "digits_scm" else state.params
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, metrics = jax.jit(obj.train_step)(state, frozen, jax.tree.map(jax.numpy.asarray, obj.batch(0)))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])), metrics
