"""The evaluation cache (`fdistill.evaluation.cache`): fingerprints that see every bit and ignore
the sharding, a store that survives the process and shrugs off bad files, and a resumed
distillation that reuses its teacher's metrics from the workdir instead of sampling the teacher
again."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdistill import train
from fdistill.distillation import teachers
from fdistill.evaluation import cache as eval_cache
from tests.helpers import tiny_distill_config


@pytest.fixture(autouse=True)
def _empty_memory():
    eval_cache.forget_in_memory()
    yield
    eval_cache.forget_in_memory()


@pytest.fixture
def teacher_calls(monkeypatch):
    """The sample counts `n` of every `teachers.sample` call (the teacher's sampling, counted)."""
    calls = []
    real_sample = teachers.sample

    def counting_sample(*args, **kwargs):
        calls.append(args[4])
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(teachers, "sample", counting_sample)
    return calls


def _tree():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(8, 16)).astype(np.float32), "b": np.zeros(16, jnp.bfloat16),
            "n": np.arange(5, dtype=np.int32)}


def test_tree_fingerprint_sees_every_bit_order_dtype_and_structure():
    base = eval_cache.tree_fingerprint(_tree())
    assert eval_cache.tree_fingerprint(_tree()) == base

    t = _tree()
    t["w"][3, 7] = np.nextafter(t["w"][3, 7], np.float32(np.inf))  # one ulp
    assert eval_cache.tree_fingerprint(t) != base
    t = _tree()
    t["w"][[0, 1]] = t["w"][[1, 0]]  # two rows swapped: same multiset of values
    assert eval_cache.tree_fingerprint(t) != base
    t = _tree()
    t["b"] = np.zeros(16, np.float32)  # same values, another dtype
    assert eval_cache.tree_fingerprint(t) != base
    t = _tree()
    t["n"] = t["n"].reshape(1, 5)
    assert eval_cache.tree_fingerprint(t) != base
    t = _tree()
    t["extra"] = np.zeros(())
    assert eval_cache.tree_fingerprint(t) != base

    flags = np.array([True, False, False])
    assert eval_cache.tree_fingerprint(flags) != eval_cache.tree_fingerprint(flags[::-1].copy())
    keys = jax.random.split(jax.random.key(0), 3)  # typed keys: hashed through their key data
    assert eval_cache.tree_fingerprint(keys) == eval_cache.tree_fingerprint(jax.random.split(jax.random.key(0), 3))
    assert eval_cache.tree_fingerprint(keys) != eval_cache.tree_fingerprint(jax.random.split(jax.random.key(1), 3))


@pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8 simulated devices of tests/conftest.py")
def test_tree_fingerprint_does_not_depend_on_the_sharding():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    t = _tree()
    sharded = {"w": jax.device_put(t["w"], NamedSharding(mesh, P("a", "b"))),
               "b": jax.device_put(t["b"], NamedSharding(mesh, P("b"))),
               "n": jax.device_put(t["n"], NamedSharding(mesh, P()))}
    assert eval_cache.tree_fingerprint(sharded) == eval_cache.tree_fingerprint(t)


def test_fingerprint_of_settings_keys_and_labels():
    settings = {"eval": {"num_samples": 16}, "devices": eval_cache.device_signature()}
    labels = np.arange(4, dtype=np.int32)
    base = eval_cache.inputs_fingerprint(settings, {"key": jax.random.PRNGKey(1), "labels": labels})
    swapped = eval_cache.inputs_fingerprint(dict(reversed(settings.items())),
                                            {"labels": labels, "key": jax.random.PRNGKey(1)})
    assert swapped == base
    assert eval_cache.inputs_fingerprint(settings, {"key": jax.random.key(1), "labels": labels}) == base  # typed key
    assert eval_cache.inputs_fingerprint(settings, {"key": jax.random.PRNGKey(2), "labels": labels}) != base
    assert eval_cache.inputs_fingerprint(settings, {"key": jax.random.PRNGKey(1), "labels": None}) != base
    assert eval_cache.inputs_fingerprint(settings, {"key": jax.random.PRNGKey(1), "labels": labels[::-1]}) != base
    assert eval_cache.inputs_fingerprint({**settings, "eval": {"num_samples": 32}},
                                         {"key": jax.random.PRNGKey(1), "labels": labels}) != base


def test_the_code_fingerprint_is_read_when_the_run_makes_its_cache():
    """Not at the first evaluation, which may come after the source was edited under a long run."""
    fp = eval_cache.code_fingerprint()
    eval_cache.code_fingerprint.cache_clear()
    try:
        eval_cache.ResultCache(None)
        assert eval_cache.code_fingerprint.cache_info().currsize == 1
        assert eval_cache.code_fingerprint() == fp
    finally:
        eval_cache.code_fingerprint.cache_clear()


def test_result_cache_round_trip_and_bad_files(tmp_path, capsys):
    d = str(tmp_path / "cache")
    result = {"teacher/fd": 1.25, "teacher/nfe": 35.0}
    eval_cache.ResultCache(d).put("teacher_metrics", "ab" * 32, result, {"what": "a test"})
    (path,) = [os.path.join(d, n) for n in os.listdir(d)]
    with open(path) as f:
        assert json.load(f)["computed_from"] == {"what": "a test"}
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]

    eval_cache.forget_in_memory()  # a new process
    assert eval_cache.ResultCache(d).get("teacher_metrics", "ab" * 32) == result
    assert eval_cache.ResultCache(d).get("teacher_metrics", "cd" * 32) is None
    assert eval_cache.ResultCache(None).get("teacher_metrics", "ab" * 32) == result  # remembered in memory

    required = ("teacher/nfe",)
    for bad in ("{not json", json.dumps({"fingerprint": "ef" * 32, "result": result}), json.dumps([1, 2]),
                json.dumps({"fingerprint": "ab" * 32, "result": {"teacher/fd": 1.25}}),  # no teacher/nfe
                json.dumps({"fingerprint": "ab" * 32, "result": {**result, "teacher/fd": "x"}}),
                json.dumps({"fingerprint": "ab" * 32, "result": [1.0]})):
        eval_cache.forget_in_memory()
        with open(path, "w") as f:
            f.write(bad)
        assert eval_cache.ResultCache(d).get("teacher_metrics", "ab" * 32, required) is None, bad
        assert "ignoring the unreadable cache file " + path in capsys.readouterr().err
    eval_cache.ResultCache(d).put("teacher_metrics", "ab" * 32, result, {})  # rewritten
    eval_cache.forget_in_memory()
    assert eval_cache.ResultCache(d).get("teacher_metrics", "ab" * 32) == result

    other = str(tmp_path / "other")
    eval_cache.ResultCache(other, writes=False).put("teacher_metrics", "ab" * 32, result, {})
    assert not os.path.exists(other)  # only process 0 writes

    eval_cache.forget_in_memory()
    nan = str(tmp_path / "nan")
    eval_cache.ResultCache(nan).put("teacher_metrics", "ab" * 32, {**result, "teacher/fd": float("nan")}, {})
    assert not os.path.exists(nan) and eval_cache.ResultCache(None).get("teacher_metrics", "ab" * 32) is None

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    eval_cache.ResultCache(str(blocked / "cache")).put("teacher_metrics", "ab" * 32, result, {})  # no exception
    assert "could not write the cache file" in capsys.readouterr().err


def test_a_result_in_memory_is_written_to_a_new_directory_and_every_process_must_have_it(tmp_path, monkeypatch):
    result = {"teacher/fd": 2.5}
    eval_cache.ResultCache(str(tmp_path / "run1")).put("teacher_metrics", "ab" * 32, result, {})
    second = str(tmp_path / "run2")  # the next run of a table script, in the same process
    assert eval_cache.ResultCache(second).get("teacher_metrics", "ab" * 32) == result
    assert os.listdir(second) == os.listdir(tmp_path / "run1")

    from fdistill import sharding

    monkeypatch.setattr(sharding, "any_process", lambda flag: True)  # another process lacks it
    assert eval_cache.ResultCache(second).get("teacher_metrics", "ab" * 32) is None


def test_the_teacher_is_sampled_again_when_its_parameters_or_the_code_change(teacher_calls, monkeypatch):
    from fdistill import objectives

    c = tiny_distill_config("gmm_fdistill", divergence="js")
    obj = objectives.build(c)
    _, frozen = obj.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(3)
    first = obj.evaluator.teacher_metrics(frozen, key, None)
    assert obj.evaluator.teacher_metrics(frozen, key, None) == first and len(teacher_calls) == 2  # warm-up + timed

    leaves, treedef = jax.tree_util.tree_flatten(frozen["teacher"])
    moved = jax.tree_util.tree_unflatten(treedef, [leaves[0] * 1.5] + leaves[1:])
    obj.evaluator.teacher_metrics({**frozen, "teacher": moved}, key, None)
    assert len(teacher_calls) == 4
    obj.evaluator.teacher_metrics(frozen, jax.random.PRNGKey(4), None)  # another evaluation key
    assert len(teacher_calls) == 6
    monkeypatch.setattr(eval_cache, "code_fingerprint", lambda: "edited")
    obj.evaluator.teacher_metrics(frozen, key, None)
    assert len(teacher_calls) == 8


def test_a_resumed_distillation_reuses_its_teachers_metrics_from_the_workdir(tmp_path, teacher_calls):
    """Each invocation is a new process for the cache (its memory is emptied): the first samples the
    teacher once, for the evaluation at step 2 and the final one (same key, labels and teacher); the
    second, resumed to step 6, never samples it and reports the same teacher metrics."""
    c = tiny_distill_config("gmm_fdistill", divergence="js")
    c.eval.num_samples = 4096  # the least a distillation evaluates
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 4, 2, 2
    c.distill.gen_lr_schedule = "constant"  # so that a resumed run may train longer
    wd = str(tmp_path / "run")
    first = train.train_and_evaluate(c, wd, num_devices=1)
    assert len(teacher_calls) == 2  # the warm-up call of the timing and the timed one, once in the run
    (name,) = os.listdir(os.path.join(wd, "cache"))
    assert name.startswith("teacher_metrics-")

    eval_cache.forget_in_memory()
    teacher_calls.clear()
    c.train.num_steps = 6
    second = train.train_and_evaluate(c, wd, num_devices=1)
    assert teacher_calls == []
    teacher = {k: v for k, v in first.items() if k.startswith("teacher/")}
    assert teacher and teacher == {k: v for k, v in second.items() if k.startswith("teacher/")}
    assert second["step"] == 6 and second["mmd"] != first["mmd"]  # the student did train on

    eval_cache.forget_in_memory()
    c.eval.num_samples = 8192  # an evaluation setting: the teacher is sampled again, once
    third = train.train_and_evaluate(c, wd, num_devices=1)
    assert len(teacher_calls) == 2 and len(os.listdir(os.path.join(wd, "cache"))) == 2
    assert third["step"] == 6
