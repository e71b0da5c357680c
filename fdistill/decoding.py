"""Decoding-time alignment on the synthetic language: Transfer Q* (Chakraborty et al., arXiv
2405.20495) and best-of-N, against plain sampling.

Transfer Q* (direct transfer) decodes token by token from the SFT policy tilted by the optimal
token-level value of the target reward r,

    pi_TQ(z | s_t) ∝ pi_SFT(z | s_t) exp(alpha Q*(s_t, z))      over the top-k tokens of pi_SFT,

where Q*(s_t, z) = E_{tau ~ rho_BL(. | [s_t, z])} r([s_t, z, tau]) is estimated by continuing the
state [s_t, z] with a *baseline model* rho_BL that is already aligned with r at the trajectory level
(here a DPO policy trained on Bradley-Terry labels of the true reward: the paper's direct transfer,
where the baseline reward is the target one), `num_rollouts` continuations per candidate, each
scored with the true reward. alpha = 1 / beta is the paper's KL trade-off: alpha -> 0 is SFT
sampling. A one-token response makes Q* = r exactly and pi_TQ the KL-regularised optimum
pi_SFT exp(alpha r) / Z (the closed-form check in tests/test_decoding.py).

The sequence KL(pi_TQ || pi_SFT) is measured exactly along each decoded trajectory: the sum over
its steps of the KL between the two next-token distributions (an unbiased estimate of the sequence
KL, as the trajectories are pi_TQ's own). Compute is counted as tokens generated per response: the
candidates' continuations (k x num_rollouts per step, each to the end of the context) plus the
decoded tokens. Best-of-N samples N SFT responses and keeps the highest true reward; its KL to the
SFT policy is reported as the analytic bound log N - (N - 1) / N (Beirami et al., arXiv 2401.01879).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.data import preference as prefdata
from fdistill.models.transformer import TransformerLM, generate


def tilted_choice(key, sft_logp: jax.Array, q: jax.Array, alpha: float):
    """(choice index [B], log pi_TQ [B, k]) of pi_TQ ∝ pi_SFT exp(alpha Q) over k candidates."""
    logits = sft_logp + alpha * q
    return jax.random.categorical(key, logits), jax.nn.log_softmax(logits, axis=-1)


def transfer_q_decode(model: TransformerLM, sft_params, baseline_params, task: prefdata.SyntheticLanguage,
                      prompts: jax.Array, key: jax.Array, *, alpha: float, top_k: int, num_rollouts: int,
                      reward_fn=None):
    """Transfer Q* responses for `prompts` [B, PROMPT_LEN] (jit-compatible; see the module docstring).

    Returns (tokens [B, seq_len], kl [B] = sum over steps of KL(pi_TQ || pi_SFT), tokens_generated [B]).
    `reward_fn(tokens) -> [n]` defaults to the task's true reward."""
    reward_fn = reward_fn or task.sequence_reward
    T, P, EOS = task.seq_len, prefdata.PROMPT_LEN, prefdata.EOS
    bias = jnp.asarray(task.grammar_bias())
    b, k, R = prompts.shape[0], int(top_k), int(num_rollouts)
    tokens = jnp.concatenate([prompts.astype(jnp.int32), jnp.full((b, T - P), prefdata.PAD, jnp.int32)], axis=1)

    def step(t, carry):  # choose the token at position t + 1
        tokens, done, kl, spent, key = carry
        key, k_roll, k_pick = jax.random.split(key, 3)
        logits = model.apply({"params": sft_params}, tokens)
        sft_logp = jax.nn.log_softmax(jax.lax.dynamic_index_in_dim(logits, t, 1, False)
                                      + jax.lax.dynamic_index_in_dim(bias, t, 0, False), axis=-1)  # [B, V]
        cand_logp, cand = jax.lax.top_k(sft_logp, k)  # [B, k]
        states = jnp.repeat(tokens, k * R, axis=0)
        states = jax.lax.dynamic_update_index_in_dim(states, jnp.repeat(cand.reshape(-1), R)[:, None], t + 1, 1)
        rolled, _ = generate(model, baseline_params, states, k_roll, T, 1.0, bias, EOS, prefdata.PAD, prefix_len=t + 2)
        q = reward_fn(rolled).reshape(b, k, R).mean(-1)
        choice, dec_logp = tilted_choice(k_pick, cand_logp, q, alpha)
        z = jnp.take_along_axis(cand, choice[:, None], 1)[:, 0]
        # KL(pi_TQ || pi_SFT) at this step: pi_TQ lives on the k candidates
        step_kl = jnp.sum(jnp.exp(dec_logp) * (dec_logp - cand_logp), -1)
        live = ~done
        kl = kl + jnp.where(live, step_kl, 0.0)
        spent = spent + jnp.where(live, k * R * (T - t - 2) + 1, 0)
        current = jax.lax.dynamic_index_in_dim(tokens, t + 1, 1, False)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(live, z, current), t + 1, 1)
        done = done | (live & (z == EOS))
        return tokens, done, kl, spent, key

    carry = (tokens, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32), key)
    tokens, _, kl, spent, _ = jax.lax.fori_loop(P - 1, T - 1, step, carry)
    return tokens, kl, spent


def best_of_n(model: TransformerLM, params, task: prefdata.SyntheticLanguage, prompts: jax.Array, key: jax.Array,
              n: int, reward_fn=None):
    """The highest-reward of `n` responses of `params` per prompt: (tokens [B, seq_len], tokens
    generated [B] = the n responses' lengths in tokens)."""
    reward_fn = reward_fn or task.sequence_reward
    b, T = prompts.shape[0], task.seq_len
    bias = jnp.asarray(task.grammar_bias())
    samples, _ = generate(model, params, jnp.repeat(prompts, n, axis=0), key, T, 1.0, bias, prefdata.EOS, prefdata.PAD)
    r = reward_fn(samples).reshape(b, n)
    best = jnp.argmax(r, axis=1)
    tokens = samples.reshape(b, n, T)[jnp.arange(b), best]
    lengths = jnp.sum(samples[:, prefdata.PROMPT_LEN:] != prefdata.PAD, axis=1).reshape(b, n)
    return tokens, jnp.sum(lengths, 1)


def best_of_n_kl_bound(n: int) -> float:
    """log N - (N - 1) / N: the KL(best-of-N || base) bound (exact for continuous rewards)."""
    return float(np.log(n) - (n - 1) / n)
