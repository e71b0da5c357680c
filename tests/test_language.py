"""The language objectives ('sft', 'po'), the LM and its sampler, the known-reward task and its
TFDS preference data, the SFT reference named by its workdir, and the preference evaluation."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdistill import objectives, train
from fdistill.configs import load as load_config
from fdistill.data import preference as prefdata
from fdistill.evaluation import preference as prefeval
from fdistill.models.transformer import TransformerLM
from fdistill.objectives import language
from tests.named_runs import check_named_run_errors


def tiny_sft_config(num_steps=60):
    c = load_config("synthetic_sft")
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_ratio = 32, 1, 2, 2
    c.train.num_steps = num_steps
    c.train.batch_size = 32
    c.train.warmup_steps = 0
    c.train.log_every = 10
    c.train.checkpoint_every = num_steps
    c.eval.samples_per_prompt = 1
    c.eval.num_heldout = 256
    c.eval.chunk = 256
    return c


def tiny_dpo_config(sft_workdir, num_steps=30, **po):
    c = load_config("synthetic_dpo")
    c.po.sft_workdir = str(sft_workdir)
    c.model = tiny_sft_config().model  # the SFT run's
    c.po.pairs.num_pairs = 256
    c.po.pairs.num_test_pairs = 64
    c.train.num_steps = num_steps
    c.train.batch_size = 32
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.checkpoint_every = num_steps
    c.eval.samples_per_prompt = 1
    c.eval.num_pairs = 64
    c.eval.chunk = 256
    for k, v in po.items():
        c.po[k] = v
    return c


def task(**kw):
    c = load_config("synthetic_sft").task
    for k, v in kw.items():
        c[k] = v
    return prefdata.SyntheticLanguage(c)


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    """A tiny finished SFT run, trained once: the reference of the 'po' runs (named by its workdir)."""
    wd = str(tmp_path_factory.mktemp("sft"))
    train.train_and_evaluate(tiny_sft_config(), wd)
    return wd


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
def test_reward_counts_distinct_targets_and_charges_every_word():
    t = task(length_cost=0.1)
    prompt = t.train_prompts[:1]
    a, b, pa = t.targets(prompt)[0]
    other = next(w for w in range(prefdata.NUM_SPECIAL, t.vocab_size) if w not in (a, b, pa))
    cases = [([a], 1 - 0.1), ([a, a], 1 - 0.2), ([a, b, pa], 3 - 0.3), ([other, a, other, b, pa], 3 - 0.5),
             ([other], -0.1)]
    for words, want in cases:
        w = np.zeros((1, t.response_len), np.int32)
        w[0, : len(words)] = words
        np.testing.assert_allclose(t.reward(prompt, w, np.array([len(words)])), [want], atol=1e-6)
    assert t.best_reward() == pytest.approx(2.7)
    # held-out prompts are disjoint from training prompts; every prompt has three distinct targets
    seen = {tuple(p) for p in t.train_prompts}
    assert not any(tuple(p) in seen for p in t.heldout_prompts)
    tg = t.targets(np.concatenate([t.train_prompts, t.heldout_prompts]))
    assert all(len(set(row)) == 3 for row in tg)


def test_sequences_masks_and_demonstrations():
    t = task()
    b = t.sft_batch(3, 16, seed=0)
    tokens, mask = b["tokens"], b["loss_mask"]
    words, num = t.split_responses(tokens)
    assert np.all(num >= 1) and np.all(num <= t.response_len - 1)
    for i in range(16):
        n = num[i]
        assert tokens[i, prefdata.PROMPT_LEN + n] == prefdata.EOS
        assert np.all(tokens[i, prefdata.PROMPT_LEN + n + 1:] == prefdata.PAD)
        np.testing.assert_array_equal(np.nonzero(mask[i])[0], prefdata.PROMPT_LEN + np.arange(n + 1))
    # deterministic in (seed, step); process slices tile the global batch
    np.testing.assert_array_equal(t.sft_batch(3, 16, seed=0)["tokens"], tokens)
    halves = [t.sft_batch(3, 16, 0, i, 2)["tokens"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), tokens)
    # the demonstrator: about demo_target_prob of the words are targets, lengths up to demo_max_words
    rng = np.random.default_rng(0)
    prompts = t.train_prompts[rng.integers(0, len(t.train_prompts), 4000)]
    w, n = t.demonstrations(rng, prompts)
    valid = np.arange(w.shape[1])[None] < n[:, None]
    is_target = (w[:, :, None] == t.targets(prompts)[:, None, :]).any(-1)
    assert abs(is_target[valid].mean() - t.demo_target_prob) < 0.02
    assert n.min() == 1 and n.max() == t.demo_max_words


def test_epoch_batches_visit_every_pair_once_per_epoch():
    n, b = 50, 8
    rows = np.concatenate([prefdata.epoch_indices(n, b, s, seed=3) for s in range(25)])  # 4 epochs
    for e in range(4):
        np.testing.assert_array_equal(np.sort(rows[e * n:(e + 1) * n]), np.arange(n))
    np.testing.assert_array_equal(prefdata.epoch_indices(n, b, 7, seed=3), rows[56:64])
    assert not np.array_equal(rows[:n], rows[n:2 * n])


# ----------------------------------------------------------------------------------------------
# The model and its sampler
# ----------------------------------------------------------------------------------------------
def test_cached_sampling_matches_full_forward_and_scores():
    t = task()
    model = TransformerLM(vocab_size=t.vocab_size, max_len=t.seq_len, width=32, depth=2, num_heads=2, mlp_ratio=2)
    params = language.init_params(model, jax.random.PRNGKey(0))
    policy = language.LMPolicy(model, t, chunk=8)
    prompts = t.heldout_prompts[:8]
    bias = t.grammar_bias()
    tokens, logp = policy.sample(params, prompts, jax.random.PRNGKey(1), greedy=True)
    # greedy with the KV cache == argmax of the full forward pass, position by position
    seq = np.concatenate([prompts, np.zeros((8, t.response_len), np.int32)], 1)
    done = np.zeros(8, bool)
    for pos in range(prefdata.PROMPT_LEN, t.seq_len):
        logits = np.asarray(model.apply({"params": params}, jnp.asarray(seq)))[:, pos - 1] + bias[pos - 1]
        nxt = np.where(done, prefdata.PAD, logits.argmax(-1))
        seq[:, pos] = nxt
        done |= nxt == prefdata.EOS
    np.testing.assert_array_equal(tokens, seq)
    # the sampler's log-probabilities are those of its own (grammar-constrained) distribution
    for temperature in (1.0, 0.7):
        tokens, logp = policy.sample(params, prompts, jax.random.PRNGKey(2), temperature)
        np.testing.assert_allclose(logp, policy.score(params, tokens), rtol=1e-4, atol=1e-4)
        words, num = t.split_responses(tokens)
        assert np.all(num >= 1) and np.all(words[words != prefdata.PAD] >= prefdata.NUM_SPECIAL)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.apply({"params": params}, jnp.zeros((1, t.seq_len + 1), jnp.int32))


def test_kl_estimate_matches_exact_enumeration():
    """Tiny language (4 words, at most 2 per response): every response can be enumerated."""
    t = task(vocab_size=8, response_len=3, demo_max_words=2)
    model = TransformerLM(vocab_size=8, max_len=t.seq_len, width=16, depth=1, num_heads=2, mlp_ratio=2)
    p, q = (language.init_params(model, jax.random.PRNGKey(i)) for i in (0, 1))
    p = jax.tree.map(lambda x: 40 * x, p)  # sharper than the near-uniform initialisation
    policy = language.LMPolicy(model, t, chunk=4096)
    prompt = t.train_prompts[:1]
    words = [[w] for w in range(4, 8)] + [[u, v] for u in range(4, 8) for v in range(4, 8)]
    w = np.zeros((len(words), 3), np.int32)
    n = np.array([len(x) for x in words])
    for i, x in enumerate(words):
        w[i, : len(x)] = x
    seqs, _, _ = t.sequences(np.repeat(prompt, len(words), 0), w, n)
    lp, lq = policy.score(p, seqs), policy.score(q, seqs)
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, rtol=1e-4)  # the grammar's responses are all there
    exact = float(np.sum(np.exp(lp) * (lp - lq)))
    tokens, logp = policy.sample(p, np.repeat(prompt, 4096, 0), jax.random.PRNGKey(3))
    est, se = prefeval.kl_estimate(logp, policy.score(q, tokens))
    assert exact > 0.05
    assert abs(est - exact) < 4 * se + 1e-3, (est, se, exact)


def test_win_rate_counts_ties_as_half():
    assert prefeval.win_rate([1.0, 0.5, 2.0, 0.1], [0.5, 0.5, 3.0, 0.1 + 1e-9]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


# ----------------------------------------------------------------------------------------------
# TFDS preference data
# ----------------------------------------------------------------------------------------------
def _records(t, n=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts = t.train_prompts[:n]
    wa, na = t.demonstrations(rng, prompts)
    wb, nb = t.demonstrations(rng, prompts)
    seq_a = t.sequences(prompts, wa, na)[0]
    seq_b = t.sequences(prompts, wb, nb)[0]
    return prefdata.to_records(prefdata.make_pairs(t, prompts, seq_a, seq_b, 0.25, seed))


def test_tfds_round_trip_and_bad_records_are_named(tmp_path):
    t = task()
    recs = _records(t)
    data_dir = str(tmp_path)
    prefdata.write_pairs(data_dir, "good", {"train": recs, "test": recs[:2]})
    out = prefdata.read_pairs(data_dir, "good", t)
    np.testing.assert_array_equal(out["train"]["index"], np.arange(6))  # sorted back by index
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(out["train"]["chosen"][i, : len(r["chosen"])], r["chosen"])
        assert out["train"]["chosen_words"][i] == len(r["chosen"])
        assert out["train"]["reward_chosen"][i] == pytest.approx(float(r["reward_chosen"]))
    assert np.all(out["train"]["reward_chosen"] == t.reward(out["train"]["prompt"], out["train"]["chosen"],
                                                            out["train"]["chosen_words"]))

    bad = [dict(r) for r in recs]
    bad[3]["rejected"] = np.zeros((0,), np.int32)
    prefdata.write_pairs(data_dir, "empty", {"train": bad, "test": recs[:2]})
    with pytest.raises(ValueError, match=r"record \d \(index 3\): field 'rejected' is an empty response"):
        prefdata.read_pairs(data_dir, "empty", t)

    bad = [dict(r) for r in recs]
    bad[4]["chosen"] = np.full((t.response_len,), 5, np.int32)
    prefdata.write_pairs(data_dir, "long", {"train": recs[:2], "test": bad})
    with pytest.raises(ValueError, match=r"split 'test': record \d \(index 4\): field 'chosen' has 12 words.*"
                                         r"over the response context config.task.response_len=12"):
        prefdata.read_pairs(data_dir, "long", t)

    rec = dict(recs[0])
    del rec["p_chosen"]
    with pytest.raises(ValueError, match=r"where: record 7 lacks field\(s\) \['p_chosen'\]"):
        prefdata.validate_record(rec, 7, "where", t)
    rec = dict(recs[0], prompt=np.array([1, 5, 6], np.int32))
    with pytest.raises(ValueError, match="field 'prompt'"):
        prefdata.validate_record(rec, 0, "where", t)
    with pytest.raises(FileNotFoundError, match="no prepared preference dataset 'never'"):
        prefdata.read_pairs(data_dir, "never", t)


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------
def init_po(objective="po", **po):
    c = tiny_dpo_config("unused", reference="init", **po)
    c.objective = objective
    return language.build_po_setup(c)


def test_po_step_precomputed_reference_equals_in_step_reference_and_traces_once():
    (o1, s1, f1, b1), (o2, s2, f2, b2) = init_po(precompute_ref=True), init_po(precompute_ref=False)
    assert "ref_chosen_logps" in b1 and "ref_chosen_logps" not in b2
    chex.clear_trace_counter()
    step1 = jax.jit(chex.assert_max_traces(o1.train_step, n=1))
    step2 = jax.jit(o2.train_step)
    for i in range(3):
        s1, m1 = step1(s1, f1, {k: jnp.asarray(v) for k, v in o1.batch(i).items()})
        s2, m2 = step2(s2, f2, {k: jnp.asarray(v) for k, v in o2.batch(i).items()})
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-4, atol=2e-4)  # Adam: lr 1e-3 per step
    assert float(m1["rewards/accuracies"]) > 0  # the policy moved away from the reference


def test_padding_never_changes_the_po_loss():
    """Also: a reference-free, length-normalised registry loss (simpo) in the 'po' objective."""
    obj, state, frozen, batch = init_po(precompute_ref=False, loss="simpo")
    params = jax.tree.map(lambda x: x + 0.05 * jnp.sign(x), state.params)  # policy != reference
    grad = jax.jit(jax.value_and_grad(obj.loss, has_aux=True))
    (l1, _), g1 = grad(params, frozen["ref"], batch)
    changed = dict(batch)
    for f in ("chosen", "rejected"):
        tok, mask = np.array(batch[f"{f}_tokens"]), np.asarray(batch[f"{f}_mask"])
        after = np.cumsum(mask, 1) == mask.sum(1, keepdims=True)  # positions after the EOS
        after &= mask == 0
        tok[after] = np.random.default_rng(0).integers(0, 32, after.sum())
        changed[f"{f}_tokens"] = jnp.asarray(tok)
        assert after.any()
    (l2, _), g2 = grad(params, frozen["ref"], changed)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                                  "apo_zero", "apo_down", "discopop", "cpo"])
def test_trl_losses_train_the_language_policy(name):
    """TRL's loss types through `config.po.loss`: a finite loss and a gradient on the policy."""
    obj, state, frozen, batch = init_po(precompute_ref=False, loss=name, nll_norm="batch")
    params = jax.tree.map(lambda x: x + 0.05 * jnp.sign(x), state.params)  # policy != reference
    (loss, metrics), grads = jax.jit(jax.value_and_grad(obj.loss, has_aux=True))(params, frozen["ref"], batch)
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["rewards/margins"]))
    norm = float(optax.global_norm(grads))
    assert np.isfinite(norm) and norm > 0


def test_unpaired_examples_keep_the_labels_and_mismatch_the_kl_completions():
    c = tiny_dpo_config("unused", reference="init")
    t = prefdata.SyntheticLanguage(c.task)
    pairs = prefdata.PreferencePairs(language.demonstrator_pairs(c, t)["train"], t, seed=3)
    ex = prefdata.UnpairedExamples(pairs)
    n = pairs.num_pairs
    assert ex.num_examples == 2 * n
    np.testing.assert_array_equal(ex.inputs["tokens"][:n], pairs.inputs["chosen_tokens"])
    np.testing.assert_array_equal(ex.inputs["tokens"][n:], pairs.inputs["rejected_tokens"])
    np.testing.assert_array_equal(ex.inputs["desirable"], np.r_[np.ones(n), np.zeros(n)])
    b = ex.batch(5, 16)
    nxt = np.roll(np.arange(16), -1)
    np.testing.assert_array_equal(b["kl_tokens"][:, :prefdata.PROMPT_LEN], b["tokens"][:, :prefdata.PROMPT_LEN])
    np.testing.assert_array_equal(b["kl_tokens"][:, prefdata.PROMPT_LEN:], b["tokens"][nxt, prefdata.PROMPT_LEN:])
    np.testing.assert_array_equal(b["kl_mask"], b["mask"][nxt])
    # the global batch is one function of the step: two processes' slices make it up
    halves = [ex.batch(5, 16, i, 2) for i in range(2)]
    for k in b:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), b[k])


def test_kto_step_compiles_once_and_starts_at_half_the_weights():
    obj, state, frozen, batch = init_po(precompute_ref=False, desirable_weight=2.0, undesirable_weight=0.0,
                                        objective="kto")
    step = jax.jit(chex.assert_max_traces(obj.train_step, n=1))
    losses = []
    for i in range(3):
        state, m = step(state, frozen, {k: jnp.asarray(v) for k, v in obj.batch(i).items()})
        losses.append(float(m["loss"]))
    d = obj.batch(0)["desirable"]
    np.testing.assert_allclose(losses[0], np.mean(d) * 2.0 / 2, rtol=1e-5)  # policy == reference: lambda / 2
    assert np.isfinite(losses[-1]) and float(m["rewards/margins"]) != 0.0
    chex.clear_trace_counter()
    with pytest.raises(ValueError, match="config.po.precompute_ref=True is not supported by objective 'kto'"):
        init_po(precompute_ref=True, objective="kto")


def test_sft_lowers_nll(sft_workdir):
    with open(os.path.join(sft_workdir, "results.json")) as f:
        res = json.load(f)
    obj = language.SFTObjective(tiny_sft_config())
    state, _ = obj.init(jax.random.PRNGKey(0))
    h = obj.heldout
    initial = float(obj._nll(state.params, jnp.asarray(h["tokens"]), jnp.asarray(h["loss_mask"])))
    assert initial > np.log(28) - 0.1  # about uniform over the words at initialisation
    assert res["nll_heldout"] < initial - 0.3, (res["nll_heldout"], initial)
    for k in ("true_reward", "mean_length", "greedy/true_reward", "demo/true_reward"):
        assert np.isfinite(res[k]), k


def test_sft_gradient_accumulation_keeps_the_full_batch_token_mean():
    """Micro-batches with different token counts: the mean of the micro-batch losses and gradients is
    the full batch's token-mean NLL and gradient (a bigram model keeps this fast)."""

    class Bigram:
        def apply(self, variables, tokens):
            return variables["params"]["w"][tokens]

    t = task()
    batch = {k: jnp.asarray(v) for k, v in t.sft_batch(0, 8, seed=0).items()}
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (t.vocab_size, t.vocab_size))}
    m = np.asarray(batch["loss_mask"])[:, 1:]
    assert m[0::2].sum() != m[1::2].sum()  # the two strided micro-batches differ in token count
    value_and_grad = jax.jit(language.sft_value_and_grad, static_argnums=(0, 3))
    full, micro = (value_and_grad(Bigram(), params, batch, k) for k in (1, 2))
    chex.assert_trees_all_close(micro, full, rtol=1e-5)
    w, tok = np.asarray(params["w"], np.float64), np.asarray(batch["tokens"])
    logp = w[tok[:, :-1]] - np.log(np.exp(w[tok[:, :-1]]).sum(-1, keepdims=True))
    token_logp = np.take_along_axis(logp, tok[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(full[0], -np.sum(token_logp * m) / m.sum(), rtol=1e-5)  # the token mean


def test_dpo_run_learns_the_pairs_and_one_and_eight_devices_agree(sft_workdir, tmp_path):
    runs = {}
    for n in (8, 1):
        wd = str(tmp_path / f"dpo{n}")
        runs[n] = train.train_and_evaluate(tiny_dpo_config(sft_workdir), wd, num_devices=n), wd
    res = runs[8][0]
    for k in ("true_reward", "kl_to_ref", "mean_length", "win_rate_vs_ref", "rewards/chosen", "rewards/rejected",
              "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "heldout/rewards/accuracies"):
        assert k in res and np.isfinite(res[k]), k
    assert res["rewards/accuracies"] > 0.5  # 0 at the start: policy == reference gives ties
    assert res["kl_to_ref"] > 0
    losses = {}
    for n, (_, wd) in runs.items():
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            losses[n] = [r["loss"] for r in map(json.loads, f) if "loss" in r and "eval/true_reward" not in r]
    assert len(losses[1]) == 30
    np.testing.assert_allclose(losses[1], losses[8], rtol=2e-5)
    # the preference dataset was written once, in the SFT workdir, and reused
    ds = os.path.join(sft_workdir, "preference_data", "synthetic_preference_pairs")
    assert len(os.listdir(ds)) == 1


def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"config.po.loss='kto' is not a known preference loss; allowed"):
        language.validate_po_config(tiny_dpo_config(tmp_path, loss="kto"))
    with pytest.raises(ValueError, match=r"config.po.reference='x' is not known; allowed: \['sft', 'init'\]"):
        language.validate_po_config(tiny_dpo_config(tmp_path, reference="x"))
    with pytest.raises(ValueError, match=r"config.po.label_smoothing must be in \[0, 0.5\), got 0.7"):
        language.validate_po_config(tiny_dpo_config(tmp_path, loss="cdpo", label_smoothing=0.7))
    c = tiny_sft_config()
    c.model.name = "mlp"
    with pytest.raises(ValueError, match=r"config.model.name='mlp' is not supported.*\['transformer'\]"):
        language.SFTObjective(c)
    c = tiny_sft_config()
    c.task.response_len = 1
    with pytest.raises(ValueError, match="config.task.response_len=1"):
        language.SFTObjective(c)


def test_sft_reference_is_a_named_finished_run_with_the_same_task_and_model(sft_workdir, tmp_path):
    check_named_run_errors(lambda wd: objectives.build(tiny_dpo_config(wd)), "po.sft_workdir", "synthetic_sft",
                           tiny_sft_config(), tmp_path)
    c = tiny_dpo_config(sft_workdir)
    c.task.length_cost = 0.2
    c.model.width = 64
    with pytest.raises(ValueError, match=r"config.po.sft_workdir='.*' was made with other task/model settings: "
                                         r"config.task.length_cost=0.2 \(run: 0.1\), config.model.width=64 \(run: 32\)"):
        objectives.build(c)
