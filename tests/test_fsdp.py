"""Parameter sharding (FSDP) on the ('data', 'fsdp') mesh: rules, placement, trajectories, checkpoints.

Every objective family follows its 1-device loss trajectory on the meshes (data 8), (data 2, fsdp 4)
and (data 1, fsdp 8), with its parameters, Adam moments and frozen networks really split; states
written on one mesh restore on another. `min_size=64` shards the tiny test networks' leaves (the
default threshold, 2**14 elements, keeps them replicated).
"""
import glob
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from fdistill import checkpoint, objectives, runs, sharding, train
from fdistill import placement as placement_lib
from tests.helpers import load_config, tiny_distill_config, tiny_score_config
from tests.test_language import tiny_dpo_config

MESHES = [(8, 1), (2, 4), (1, 8)]  # (data, fsdp)
NUM_STEPS = 10


def rules(fsdp):
    return sharding.ShardingRules(fsdp=fsdp, min_size=64)


# ----- mesh and rules -----------------------------------------------------------------------------
def test_mesh_shape_and_bad_fsdp_is_named():
    mesh = sharding.make_mesh(8, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    with pytest.raises(ValueError, match=r"config.mesh.fsdp=3 must divide the number of devices \(8\); "
                                         r"allowed: \[1, 2, 4, 8\]"):
        sharding.make_mesh(8, fsdp=3)


def test_default_rule_splits_the_largest_divisible_dimension_above_the_threshold():
    r = sharding.ShardingRules(fsdp=4, min_size=100)
    P = jax.sharding.PartitionSpec
    assert r.spec("w", (8, 64)) == P(None, "fsdp")
    assert r.spec("w", (64, 8)) == P("fsdp")
    assert r.spec("w", (6, 40)) == P(None, "fsdp")  # 6 is not divisible by 4
    assert r.spec("w", (64, 64)) == P("fsdp")  # ties: the first
    assert r.spec("w", (3, 33)) == P()  # nothing divisible
    assert r.spec("b", (64,)) == P()  # below the threshold
    assert sharding.ShardingRules(fsdp=1, min_size=0).spec("w", (8, 64)) == P()


def test_config_rules_win_and_bad_rules_name_the_field():
    c = load_config("gmm_score").mesh
    c.fsdp, c.rules = 4, ("Dense_0/kernel$=replicate", "kernel$=fsdp,None")
    r = sharding.ShardingRules.from_config(c)
    P = jax.sharding.PartitionSpec
    assert r.spec("params/Dense_0/kernel", (64, 128)) == P()
    assert r.spec("params/Dense_1/kernel", (64, 128)) == P("fsdp", None)
    with pytest.raises(ValueError, match="does not divide it"):
        r.spec("params/Dense_1/kernel", (6, 128))
    for bad, message in [(("kernel",), r"config.mesh.rules\[0\]='kernel': expected 'regex=spec'"),
                         (("(=fsdp",), r"is not a regular expression"),
                         (("kernel=fsdp,model",), r"'model' is not a mesh axis")]:
        c.rules = bad
        with pytest.raises(ValueError, match=message):
            sharding.ShardingRules.from_config(c)


# ----- trajectories -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
    """A tiny finished score run: the teacher of DMD2 and the reference of Diffusion-DPO."""
    wd = str(tmp_path_factory.mktemp("score_run"))
    train.train_and_evaluate(tiny_score_config(10), wd)
    return wd


def diffusion_po_config(reference):
    c = load_config("gmm_diffusion_dpo")
    c.dpo.reference = reference
    c.model = tiny_score_config().model
    c.pairs.num_pairs = 256
    c.train.batch_size = 64
    return c


def dmd2_config(teacher):
    c = tiny_distill_config("gmm_dmd2", teacher=teacher)
    c.data = tiny_score_config().data  # the teacher's mixture
    return c


CONFIGS = {
    "score": lambda run: tiny_score_config(),
    "distill": lambda run: tiny_distill_config(),
    "distill_dmd2_teacher": dmd2_config,
    "dmd2_multistep": lambda run: tiny_distill_config("gmm_dmd2_multistep", step_aware_critic=True),
    "tdm": lambda run: tiny_distill_config("gmm_tdm"),
    "dpo": lambda run: tiny_dpo_config("unused", reference="init"),
    "diffusion_po": lambda run: diffusion_po_config(run),
}
# float32 reductions in another order (~1e-7) grow over 10 steps of a GAN critic or through
# Diffusion-DPO's beta / 2 = 50; the state then agrees to the same relative tolerance.
RTOL = {"distill": 1e-4, "distill_dmd2_teacher": 1e-4, "dmd2_multistep": 1e-4, "tdm": 1e-4, "diffusion_po": 1e-4}
# The Transformer's key bias has an exactly zero gradient (it shifts every logit of a query's
# softmax equally); Adam turns its float noise into steps of size lr (1e-3) in any direction.
PARAM_ATOL = {"dpo": NUM_STEPS * 1e-3}


def run_on_mesh(obj, data, fsdp, steps=NUM_STEPS):
    """Losses, final host state and placement of `steps` steps on a (data, fsdp) mesh, the step
    compiled once."""
    mesh = sharding.make_mesh(data * fsdp, fsdp)
    key = jax.random.PRNGKey(0)
    placement, frozen = placement_lib.on_mesh(obj, key, mesh, rules(fsdp))
    state = placement.init_state(obj, key, frozen)
    obj.train_step = chex.assert_max_traces(obj.train_step, n=1)
    step = placement.jit_step(obj)
    losses = []
    for i in range(steps):
        state, m = step(state, frozen, sharding.shard_batch(obj.batch(i), mesh))
        losses.append(float(m["loss"]))
    chex.clear_trace_counter()
    return np.array(losses), state, placement


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meshes_follow_the_one_device_trajectory(name, score_run):
    config = CONFIGS[name](score_run)
    ref_losses, ref_state, _ = run_on_mesh(objectives.build(config), 1, 1)
    ref_host = sharding.to_host(ref_state)
    rtol = RTOL.get(name, 1e-5)
    for data, fsdp in MESHES:
        losses, state, placement = run_on_mesh(objectives.build(config), data, fsdp)
        np.testing.assert_allclose(losses, ref_losses, rtol=rtol, atol=1e-6, err_msg=f"mesh {data}x{fsdp}")
        chex.assert_trees_all_close(sharding.to_host(state.params), ref_host.params, rtol=10 * rtol,
                                    atol=PARAM_ATOL.get(name, 1e-5))
        if fsdp > 1:
            _, _, split, count = placement_lib.per_device_bytes(placement.abstract_state)
            assert split > 0, f"{name}: no state leaf sharded on mesh {data}x{fsdp}"


def test_sharded_leaves_hold_one_fsdp_th_per_device(score_run):
    obj = objectives.build(dmd2_config(score_run))  # a network teacher
    _, state, placement = run_on_mesh(obj, 2, 4, steps=1)
    assert isinstance(obj.frozen()["teacher"], checkpoint.StoredTree)  # read by Orbax onto its shardings
    frozen = placement_lib.place_frozen(obj.frozen(), placement.frozen)
    sharded = 0
    for tree in (state.params, state.opt_state, state.ema_params, frozen):
        for x in jax.tree.leaves(tree):
            if x.sharding.is_fully_replicated:
                continue
            sharded += 1
            for shard in x.addressable_shards:
                assert shard.data.size * 4 == x.size, (x.shape, shard.data.shape)
    assert sharded >= 4
    # The frozen teacher too: its kernels are split.
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(frozen))


# ----- checkpoints across meshes -------------------------------------------------------------------
def test_checkpoints_restore_onto_other_meshes(tmp_path):
    config = tiny_score_config()
    obj = objectives.build(config)
    _, state, _ = run_on_mesh(obj, 2, 4, steps=3)
    expected = sharding.to_host(state)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1, save_every=1)
    ckpt.save(3, state)
    ckpt.close()
    for devices, fsdp in [(8, 8), (8, 1), (1, 1), (4, 2)]:
        mesh = sharding.make_mesh(devices, fsdp)
        placement, _ = placement_lib.on_mesh(obj, jax.random.PRNGKey(0), mesh, rules(fsdp))
        ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1, save_every=1)
        restored, step = ckpt.restore_latest(placement.abstract_state)
        ckpt.close()
        assert step == 3
        chex.assert_trees_all_equal(sharding.to_host(restored), expected)
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(placement.state)):
            assert x.sharding.is_equivalent_to(s, x.ndim)


def test_frozen_networks_are_read_straight_onto_their_shardings(score_run, tmp_path):
    """Another run's parameters (`runs.stored_params`) are shapes until placed, then Orbax reads
    only that subtree onto the shardings, each device receiving its shard; a damaged one is an
    error naming the checkpoint."""
    run = runs.open_run(score_run, "distill.teacher", runs.DIFFUSION_RUNS, "gmm_score")
    stored = runs.stored_params(run)
    saved = checkpoint.restore_tree(score_run)
    expected = saved["ema_params"] or saved["params"]
    chex.assert_trees_all_equal(stored.numpy(), expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(stored.abstract(), expected)
    mesh = sharding.make_mesh(8, 4)
    shardings = rules(4).shardings(stored.abstract(), mesh)
    placed = stored.restore(shardings)
    split = 0
    for x, s in zip(jax.tree.leaves(placed), jax.tree.leaves(shardings)):
        assert x.sharding == s
        split += not s.is_fully_replicated
        assert all(shard.data.size * (1 if s.is_fully_replicated else 4) == x.size for shard in x.addressable_shards)
    assert split > 0
    chex.assert_trees_all_equal(sharding.to_host(placed), expected)
    half = runs.stored_params(run, dtype=jax.numpy.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.abstract())} == {np.dtype(jax.numpy.bfloat16)}
    chex.assert_trees_all_equal(half.numpy(), jax.tree.map(lambda x: np.asarray(x, jax.numpy.bfloat16), expected))

    damaged = tmp_path / "damaged"
    shutil.copytree(score_run, damaged)
    for path in glob.glob(str(damaged / "checkpoints" / "*" / "**" / "d" / "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    damaged_run = runs.open_run(str(damaged), "distill.teacher", runs.DIFFUSION_RUNS, "gmm_score")
    with pytest.raises(RuntimeError, match=rf"{damaged}/checkpoints.* (is unreadable|has readable metadata)"):
        runs.stored_params(damaged_run).restore(shardings)


def test_fsdp_run_gives_the_replicated_run_results_and_resumes_on_another_mesh(tmp_path, monkeypatch):
    """The loop end to end: `--config.mesh.fsdp=4` trains and evaluates like fsdp=1 (evaluating on
    the mesh: the state it samples with is still sharded), and its workdir resumes with fsdp=8 (the
    mesh may change on resume)."""
    from fdistill.objectives.score import ScoreObjective

    evaluated_sharded = []
    evaluate = ScoreObjective.evaluate

    def spy(self, state, frozen, key):
        evaluated_sharded.append(any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params)))
        return evaluate(self, state, frozen, key)

    monkeypatch.setattr(ScoreObjective, "evaluate", spy)
    results = {}
    for fsdp in (1, 4):
        config = tiny_score_config(12, checkpoint_every=6)
        config.mesh.fsdp, config.mesh.min_shard_size = fsdp, 64
        results[fsdp] = train.train_and_evaluate(config, str(tmp_path / str(fsdp)))
    for k in ("mmd", "mode_coverage", "mode_weight_tv", "high_quality_frac"):
        np.testing.assert_allclose(results[4][k], results[1][k], rtol=1e-3, atol=1e-6, err_msg=k)
    assert evaluated_sharded == [False, True]
    config = tiny_score_config(14, checkpoint_every=6)
    config.mesh.fsdp, config.mesh.min_shard_size = 8, 64
    train.train_and_evaluate(config, str(tmp_path / "4"))
    with open(tmp_path / "4" / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == list(range(1, 15))


def test_bad_mesh_fields_fail_before_training(tmp_path):
    config = tiny_score_config()
    config.mesh.fsdp = 3
    with pytest.raises(ValueError, match=r"config.mesh.fsdp=3 must divide"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    config.mesh.fsdp, config.mesh.rules = 2, ("kernel=fsdp,fsdp,fsdp",)
    with pytest.raises(ValueError, match=r"more entries than dimensions"):
        train.train_and_evaluate(config, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b" / "checkpoints") or not os.listdir(tmp_path / "b" / "checkpoints")
