"""The learned reward model (fdistill.objectives.reward_model), pairs relabelled by it, and the
objectives that optimise against it (`po.reward_model`)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import runs, train
from fdistill.data import preference as prefdata
from fdistill.objectives import language, reward_model
from tests.test_language import tiny_dpo_config


def rm_config(num_steps=60):
    c = tiny_dpo_config("unused", reference="init", num_steps=num_steps)
    c.objective = "reward_model"
    c.po.precompute_ref = False
    c.train.learning_rate = 3e-3
    return c


def test_relabel_pairs_follows_the_proxy_and_keeps_each_pair():
    c = rm_config()
    task = prefdata.SyntheticLanguage(c.task)
    arrays = language.demonstrator_pairs(c, task)["train"]
    # a proxy that reverses the true reward, at a tiny temperature: every label follows it
    out = prefdata.relabel_pairs(arrays, -arrays["reward_chosen"], -arrays["reward_rejected"], 1e-6, 0)
    strict = ~np.isclose(arrays["reward_chosen"], arrays["reward_rejected"])
    assert np.all(out["reward_chosen"][strict] < out["reward_rejected"][strict])
    for a, b in (("chosen", "rejected"), ("reward_chosen", "reward_rejected")):
        same = np.all(out[a] == arrays[a], axis=tuple(range(1, arrays[a].ndim)))
        swapped = np.all(out[a] == arrays[b], axis=tuple(range(1, arrays[a].ndim)))
        assert np.all(same | swapped)
    np.testing.assert_array_equal(out["prompt"], arrays["prompt"])


def test_bag_of_words_reward_reads_only_the_response_before_eos():
    task = prefdata.SyntheticLanguage(rm_config().task)
    model = reward_model.BagOfWordsReward(task.vocab_size, task.response_len, 16, 1)
    tokens, _, _ = task.sequences(task.train_prompts[:4], np.full((4, 3), 7), np.array([1, 2, 3, 3]))
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"]
    r = model.apply({"params": params}, jnp.asarray(tokens))
    after = tokens.copy()
    after[:, prefdata.PROMPT_LEN + 4:] = 9  # after every EOS
    np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(after)), r, rtol=1e-6)


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("rm"))
    res = train.train_and_evaluate(rm_config(), wd)
    return wd, res


def test_reward_model_learns_the_pairs(rm_workdir):
    wd, res = rm_workdir
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl")) if '"loss"' in line]
    assert rows[-1]["loss"] < 0.6 < rows[-1]["accuracy"]  # it fits its training pairs (log 2 = 0.693 at the start)
    assert 0.0 <= res["accuracy"] <= 1.0 and np.isfinite(res["true_reward_corr"])
    run = runs.open_run(wd, "reward_model", ("reward_model",), "synthetic_reward_model")
    fn, params = reward_model.load(run)
    task = prefdata.SyntheticLanguage(run.config.task)
    tokens, _, _ = task.sequences(task.train_prompts[:3], np.full((3, 2), 5), np.array([1, 2, 2]))
    assert np.asarray(fn(params, jnp.asarray(tokens))).shape == (3,)


def test_grpo_against_a_learned_reward_reports_both_rewards(rm_workdir):
    wd, _ = rm_workdir
    c = tiny_dpo_config("unused", reference="init", reward_model=wd)
    c.objective = "grpo"
    c.train.batch_size = 8
    obj, state, frozen, batch = language.build_po_setup(c)
    state, m = jax.jit(obj.train_step)(state, frozen, batch)
    assert float(m["reward"]) != pytest.approx(float(m["true_reward"]), abs=1e-4)
    proxy = np.asarray(obj.proxy_reward(frozen["reward_model"], obj.rollout(state.params, jnp.asarray(batch["prompts"]),
                                                                            jax.random.PRNGKey(0))[0]))
    assert proxy.shape == (8 * c.po.group_size,)


def test_dpo_against_a_learned_reward_trains_on_its_labels(rm_workdir):
    wd, _ = rm_workdir
    c = tiny_dpo_config("unused", reference="init", reward_model=wd)
    obj, _, _, _ = language.build_po_setup(c)
    base, _, _, _ = language.build_po_setup(tiny_dpo_config("unused", reference="init"))
    a, b = obj.pairs.arrays, base.pairs.arrays
    np.testing.assert_array_equal(a["prompt"], b["prompt"])
    assert np.any(a["chosen"] != b["chosen"])  # some labels follow the learned reward, not the true one
    np.testing.assert_array_equal(obj.test_pairs.arrays["chosen"], base.test_pairs.arrays["chosen"])
    # a reward model of another task is refused, naming the field
    other = tiny_dpo_config("unused", reference="init", reward_model=wd)
    other.task.length_cost = 0.2
    with pytest.raises(ValueError, match=r"config.po.reward_model=.* was made with other task settings"):
        language.build_po_setup(other)
