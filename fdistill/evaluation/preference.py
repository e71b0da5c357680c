"""Known-reward evaluation of a language-model policy against its reference.

For responses y_i ~ pi(. | x_i) on held-out prompts x_i (i = 1..n):

  * true_reward      = mean_i r(x_i, y_i)                                  (the hidden task reward)
  * kl_to_ref        = mean_i [log pi(y_i | x_i) - log pi_ref(y_i | x_i)], the Monte-Carlo estimate
                       of KL(pi || pi_ref) = E_{y ~ pi} log(pi / pi_ref), summed over the response's
                       tokens (nats per response); `kl_to_ref_stderr` is its standard error
  * mean_length      = mean number of words per response (EOS not counted)
  * win_rate_vs_ref  = mean_i [1(r(x_i, y_i) > r(x_i, y'_i)) + 0.5 * 1(r(x_i, y_i) = r(x_i, y'_i))]
                       with y'_i ~ pi_ref(. | x_i) drawn independently for the same prompt.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def kl_estimate(policy_logps: np.ndarray, ref_logps: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of log pi(y) - log pi_ref(y) over samples y ~ pi."""
    d = np.asarray(policy_logps, np.float64) - np.asarray(ref_logps, np.float64)
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(np.mean(d)), se


def win_rate(r_policy: np.ndarray, r_ref: np.ndarray) -> float:
    """Fraction of prompts where the policy's response has the higher true reward (ties count 1/2)."""
    r_policy, r_ref = np.asarray(r_policy, np.float64), np.asarray(r_ref, np.float64)
    close = np.isclose(r_policy, r_ref, rtol=0.0, atol=1e-6)
    return float(np.mean(np.where(close, 0.5, (r_policy > r_ref).astype(np.float64))))


def response_metrics(task, prompts: np.ndarray, tokens: np.ndarray, prefix: str = "") -> tuple[dict, np.ndarray]:
    """({true_reward, true_reward_std, mean_length, optimal_frac}, rewards [n]) of generated sequences.

    `optimal_frac` is the fraction of responses that reach the best possible reward."""
    words, num_words = task.split_responses(tokens)
    r = task.reward(prompts, words, num_words)
    metrics = {
        f"{prefix}true_reward": float(np.mean(r)),
        f"{prefix}true_reward_std": float(np.std(r)),
        f"{prefix}mean_length": float(np.mean(num_words)),
        f"{prefix}optimal_frac": float(np.mean(np.isclose(r, task.best_reward(), atol=1e-5))),
    }
    return metrics, r


def evaluate_policy(task, sample: Callable, score: Callable, params, ref_params, prompts: np.ndarray,
                    key, ref_samples: tuple | None = None) -> tuple[dict[str, float], tuple, tuple | None]:
    """The metrics of the module docstring for `params` against `ref_params`.

    `sample(params, prompts, key) -> (tokens [n, T], logp [n])` draws one response per prompt row
    (logp under the policy's own sampling distribution); `score(params, tokens) -> logp [n]` scores
    sequences under another policy with the same distribution. `ref_samples` (as returned by an
    earlier call on the same prompts and key) are reused when given. Returns
    (metrics, (tokens, rewards) of the policy, ref_samples = (tokens, rewards, metrics) or None).
    """
    import jax

    k_pol, k_ref = jax.random.split(key)
    tokens, logp = sample(params, prompts, k_pol)
    metrics, r = response_metrics(task, prompts, tokens)
    if ref_params is None:
        return metrics, (tokens, r), None
    ref_logp = score(ref_params, tokens)
    metrics["kl_to_ref"], metrics["kl_to_ref_stderr"] = kl_estimate(logp, ref_logp)
    if ref_samples is None:
        ref_tokens, _ = sample(ref_params, prompts, k_ref)
        ref_metrics, r_ref = response_metrics(task, prompts, ref_tokens, prefix="ref/")
        ref_samples = (ref_tokens, r_ref, ref_metrics)
    metrics.update(ref_samples[2])
    metrics["win_rate_vs_ref"] = win_rate(r, ref_samples[1])
    return metrics, (tokens, r), ref_samples
