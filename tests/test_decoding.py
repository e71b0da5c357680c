"""Transfer Q* and best-of-N decoding (fdistill.decoding) on a tiny random policy: the closed form
of a one-token response, the compute count, and generate's prefix continuation."""
import jax
import jax.numpy as jnp
import numpy as np

from fdistill import decoding
from fdistill.configs import load as load_config
from fdistill.data import preference as prefdata
from fdistill.models.transformer import generate
from fdistill.objectives import language


def tiny(response_len=12):
    c = load_config("synthetic_sft")
    c.task.response_len = response_len
    c.task.demo_max_words = 0
    c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
    task = prefdata.SyntheticLanguage(c.task)
    model = language.build_model(c.model, task)
    return task, model, language.init_params(model, jax.random.PRNGKey(0)), language.init_params(model, jax.random.PRNGKey(1))


def test_one_token_response_decodes_the_kl_regularised_optimum():
    """With one word per response, Q*(x, z) = r(x, z) exactly and pi_TQ = pi_SFT exp(alpha r) / Z."""
    task, model, sft, baseline = tiny(response_len=2)
    alpha, n = 3.0, 4000
    prompt = task.train_prompts[:1]
    prompts = jnp.asarray(np.repeat(prompt, n, axis=0))
    k = task.num_content  # every allowed first token
    fn = jax.jit(lambda key: decoding.transfer_q_decode(model, sft, baseline, task, prompts, key, alpha=alpha,
                                                        top_k=k, num_rollouts=1))
    tokens, kl, spent = fn(jax.random.PRNGKey(2))
    tokens = np.asarray(tokens)
    assert np.all(tokens[:, prefdata.PROMPT_LEN + 1] == prefdata.EOS)  # one word, then the forced EOS
    # closed form over the content words
    logits = model.apply({"params": sft}, jnp.asarray(np.concatenate([prompt, [[prefdata.PAD] * 2]], 1)))
    sft_logp = jax.nn.log_softmax(logits[0, prefdata.PROMPT_LEN - 1] + task.grammar_bias()[prefdata.PROMPT_LEN - 1])
    words = np.arange(prefdata.NUM_SPECIAL, task.vocab_size)
    r = np.isin(words, task.targets(prompt)[0]).astype(np.float64) - task.length_cost
    p_sft = np.exp(np.asarray(sft_logp, np.float64)[words])
    p_opt = p_sft * np.exp(alpha * r)
    p_opt /= p_opt.sum()
    counts = np.bincount(tokens[:, prefdata.PROMPT_LEN] - prefdata.NUM_SPECIAL, minlength=len(words)) / n
    hit = np.isin(words, task.targets(prompt)[0])
    np.testing.assert_allclose(counts[hit].sum(), p_opt[hit].sum(), atol=4 * np.sqrt(0.25 / n))
    assert np.abs(counts - p_opt).max() < 4 * np.sqrt(0.25 / n)
    np.testing.assert_allclose(kl, np.sum(p_opt * np.log(p_opt / p_sft)), rtol=2e-3)  # forced EOS adds 0
    np.testing.assert_array_equal(spent, k * 1 * 1 + 2)  # k one-token continuations + 2 decoded tokens


def test_alpha_zero_is_sft_sampling_in_distribution_and_kl_zero():
    task, model, sft, baseline = tiny(response_len=4)
    prompts = jnp.asarray(task.train_prompts[:64])
    tokens, kl, _ = decoding.transfer_q_decode(model, sft, baseline, task, prompts, jax.random.PRNGKey(0),
                                               alpha=0.0, top_k=task.vocab_size, num_rollouts=1)
    np.testing.assert_allclose(kl, 0.0, atol=1e-5)
    assert np.all(np.asarray(task.sequence_reward(tokens)) > -1)


def test_prefix_generation_continues_the_given_tokens():
    task, model, sft, _ = tiny()
    bias = jnp.asarray(task.grammar_bias())
    prompts = jnp.asarray(task.train_prompts[:8])
    T = task.seq_len
    plain, lp = generate(model, sft, prompts, jax.random.PRNGKey(5), T, 1.0, bias, prefdata.EOS, prefdata.PAD)
    padded = jnp.concatenate([prompts, jnp.full((8, T - prefdata.PROMPT_LEN), 7, jnp.int32)], 1)
    same, lp2 = generate(model, sft, padded, jax.random.PRNGKey(5), T, 1.0, bias, prefdata.EOS, prefdata.PAD,
                         prefix_len=prefdata.PROMPT_LEN)
    np.testing.assert_array_equal(plain, same)
    np.testing.assert_allclose(lp, lp2, rtol=1e-6)
    # a longer prefix is kept as given, per row
    lens = jnp.asarray([prefdata.PROMPT_LEN + 2] * 8)
    cont, _ = generate(model, sft, plain, jax.random.PRNGKey(6), T, 1.0, bias, prefdata.EOS, prefdata.PAD, prefix_len=lens)
    np.testing.assert_array_equal(cont[:, : prefdata.PROMPT_LEN + 2], plain[:, : prefdata.PROMPT_LEN + 2])


def test_best_of_n_keeps_the_best_of_its_samples():
    task, model, sft, _ = tiny()
    prompts = jnp.asarray(task.train_prompts[:16])
    key, n = jax.random.PRNGKey(3), 6
    best, spent = decoding.best_of_n(model, sft, task, prompts, key, n)
    samples, _ = generate(model, sft, jnp.repeat(prompts, n, axis=0), key, task.seq_len, 1.0,
                          jnp.asarray(task.grammar_bias()), prefdata.EOS, prefdata.PAD)
    r = np.asarray(task.sequence_reward(samples)).reshape(16, n)
    np.testing.assert_allclose(task.sequence_reward(best), r.max(1))
    assert np.all(np.asarray(spent) >= 2 * n)
    assert decoding.best_of_n_kl_bound(1) == 0.0 and abs(decoding.best_of_n_kl_bound(4) - (np.log(4) - 0.75)) < 1e-12
