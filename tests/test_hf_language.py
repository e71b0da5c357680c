"""Preference optimisation and SFT of a Hugging Face checkpoint on TRL-format files
(`fdistill.objectives.hf_language`), on a tiny random Llama and data the tests write."""
import glob
import types

import chex
import jax
import numpy as np
import pytest

from fdistill import configs, objectives, placement, sharding, train
from tests import hf_helpers
from tests.helpers import logged_rows


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory):
    """(checkpoint dir, 200-pair JSONL) of the copy task, a 0.4M-parameter Llama."""
    root = tmp_path_factory.mktemp("hf")
    model = str(root / "model")
    hf_helpers.make_checkpoint(model, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
    return model, hf_helpers.copy_task_pairs(str(root / "pairs.jsonl"), n=200)


def dpo_config(model: str, data: str, **po) -> configs.ConfigDict:
    c = configs.load("hf_dpo")
    c.model.hf_path, c.data.path = model, data
    c.data.max_length = 24
    c.train.update(num_steps=50, batch_size=8, learning_rate=5e-4, warmup_steps=0, log_every=25, checkpoint_every=50)
    c.eval.update(max_new_tokens=6, num_pairs=256)
    c.po.update(po)
    return c


def test_dpo_learns_the_copy_task_in_50_steps(copy_task, tmp_path):
    """The issue's check: DPO, 50 steps of 8 pairs on a 2.9M-parameter Llama, raises the
    implicit-reward accuracy on the training pairs above 0.9 (from 0: at step 0 policy = reference,
    every margin is 0, a tie)."""
    _, data = copy_task
    model = str(tmp_path / "model")
    hf_helpers.make_checkpoint(model, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688)
    results = train.train_and_evaluate(dpo_config(model, data), str(tmp_path / "run"))
    assert results["num_params"] > 2.5e6
    assert results["rewards/accuracies"] > 0.9, results
    assert results["rewards/margins"] > 0 and results["loss"] < np.log(2)
    assert results["data/num_pairs"] == 190  # 5% of the 200 rows held out
    assert 0 <= results["heldout/rewards/accuracies"] <= 1
    text = open(glob.glob(str(tmp_path / "run" / "plots" / "samples_*.txt"))[0]).read()
    assert "[prompt]" in text and "copy w" in text
    rows = logged_rows(tmp_path / "run")
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(rows[0])


@pytest.mark.parametrize("loss", ["ipo", "simpo", "rpo", "orpo"])
def test_every_registry_loss_is_selectable(copy_task, loss):
    model, data = copy_task
    obj = objectives.build(dpo_config(model, data, loss=loss))
    state, frozen = obj.init(jax.random.PRNGKey(0))
    state, metrics = jax.jit(obj.train_step)(state, frozen, obj.batch(0))
    assert np.isfinite(float(metrics["loss"])) and "rewards/accuracies" in metrics


def test_step_compiles_once_fsdp_matches_replicated_and_precomputed_reference(copy_task):
    """One compiled step; parameters sharded over fsdp=4 of 8 devices give the replicated run's
    losses; the reference log-probs computed once equal those computed in the step."""
    model, data = copy_task
    results = {}
    for name, fsdp, pre in (("fsdp4", 4, False), ("replicated", 1, False), ("precomputed", 1, True)):
        c = dpo_config(model, data, precompute_ref=pre)
        c.mesh.fsdp = fsdp
        obj = objectives.build(c)
        mesh = sharding.make_mesh(8, fsdp)
        place, frozen = placement.on_mesh(obj, jax.random.PRNGKey(0), mesh, sharding.ShardingRules.from_config(c.mesh))
        state = place.init_state(obj, jax.random.PRNGKey(0), frozen)
        chex.clear_trace_counter()
        counted = types.SimpleNamespace(train_step=chex.assert_max_traces(obj.train_step, n=1))
        step = place.jit_step(counted if fsdp == 4 else obj)
        losses = []
        for i in range(3):
            state, m = step(state, frozen, sharding.shard_batch(obj.batch(i), mesh))
            losses.append(float(m["loss"]))
        if fsdp == 4:
            gate = state.params["layers_0"]["mlp"]["gate_proj"]["kernel"]  # [128, 256]: split on its 256
            assert gate.sharding.shard_shape(gate.shape) == (128, 64)
        results[name] = losses
    np.testing.assert_allclose(results["fsdp4"], results["replicated"], rtol=1e-4)
    np.testing.assert_allclose(results["precomputed"], results["replicated"], rtol=1e-4)
    assert results["replicated"][0] == pytest.approx(np.log(2), abs=1e-5)  # policy = reference at step 0


def test_conversational_data_and_bfloat16_reference(copy_task, tmp_path):
    model, _ = copy_task
    data = hf_helpers.copy_task_pairs(str(tmp_path / "chat.jsonl"), n=40, conversational=True)
    c = dpo_config(model, data)
    c.model.param_dtype = "bfloat16"
    c.train.batch_size = 8
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree.leaves(frozen["ref"])} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    batch = obj.batch(0)
    assert np.all(batch["chosen_tokens"][:, :2] == [4, 8])  # '<|im_start|>user': the chat template (no BOS: the template writes none)
    state, metrics = jax.jit(obj.train_step)(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))


def test_bad_settings_are_clear_errors(copy_task, tmp_path):
    model, data = copy_task
    with pytest.raises(ValueError, match="config.model.hf_path is empty"):
        objectives.build(dpo_config("", data))
    with pytest.raises(FileNotFoundError, match="config.model.hf_path=.*no config.json"):
        objectives.build(dpo_config(str(tmp_path), data))
    with pytest.raises(FileNotFoundError, match="config.data.path=.*does not exist"):
        objectives.build(dpo_config(model, str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="config.po.loss='dpoo'"):
        objectives.build(dpo_config(model, data, loss="dpoo"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "copy w1 :", "chosen": " w1", "rejected": " w2"}\n{"prompt": "copy w1 :", "chosen": " w1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl.*row 1.*rejected"):
        objectives.build(dpo_config(model, str(bad)))
    assert not glob.glob(str(tmp_path / "bad_tfds" / "*" / "*"))  # nothing written
    c = dpo_config(model, data)
    c.train.batch_size = 512
    with pytest.raises(ValueError, match="config.train.batch_size=512 exceeds"):
        objectives.build(c)


def sft_config(model: str, data: str) -> configs.ConfigDict:
    c = configs.load("hf_sft")
    c.model.hf_path, c.data.path = model, data
    c.data.max_length = 24
    c.train.update(num_steps=100, batch_size=16, learning_rate=1e-3, warmup_steps=0, log_every=50, checkpoint_every=100)
    c.eval.update(max_new_tokens=6, num_pairs=64)
    return c


def test_sft_learns_the_copy_task_then_dpo_starts_from_it(copy_task, tmp_path):
    """SFT on prompt-completion rows lowers the held-out completion NLL from the random model's
    ~log(vocab); DPO with po.sft_workdir starts from (and is referenced to) the SFT policy."""
    model, pairs = copy_task
    data = hf_helpers.copy_task_sft(str(tmp_path / "sft.jsonl"), n=2000)
    c = sft_config(model, data)
    obj = objectives.build(c)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    before = obj.evaluate(state, frozen, jax.random.PRNGKey(0))["heldout/loss"]
    assert before == pytest.approx(np.log(70), rel=0.15)  # the random checkpoint: near uniform over 70 tokens
    sft_dir = str(tmp_path / "sft")
    after = train.train_and_evaluate(c, sft_dir)
    assert after["heldout/loss"] < 0.5 * before, (before, after["heldout/loss"])
    d = dpo_config(model, pairs, sft_workdir=sft_dir)
    d.train.num_steps = 2
    dpo = objectives.build(d)
    dstate, dfrozen = dpo.init(jax.random.PRNGKey(0))
    sft_params = jax.tree.leaves(dfrozen["ref"])
    assert any(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > 0
               for a, b in zip(sft_params, jax.tree.leaves(frozen["init"])))  # not the raw checkpoint
    d.model.remat = True  # another model section: refused
    with pytest.raises(ValueError, match="config.model.remat=True"):
        objectives.build(d)


def test_sft_frees_its_starting_parameters_after_init(copy_task, tmp_path):
    """The starting parameters are `init_only`: the loop drops them once the state exists."""
    model, _ = copy_task
    c = sft_config(model, hf_helpers.copy_task_sft(str(tmp_path / "sft.jsonl"), n=40))
    c.train.num_steps = 2
    obj = objectives.build(c)
    assert obj.init_only == ("init",)
    results = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(results["loss"]) and results["step"] == 2
