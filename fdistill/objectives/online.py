"""On-policy preference optimisation of the synthetic-language SFT policy against its true reward:
GRPO, RLOO and online DPO. Each step samples its own responses, inside the jitted step, from the
current policy (the KV-cached `generate`, with the task's grammar) on the step's prompts, a
function of (train.seed, step) only.

With P = `train.batch_size` prompts, G = `po.group_size` responses per prompt, r the true reward
(`SyntheticLanguage.sequence_reward`, the task's hidden reward in JAX) or, with `po.reward_model`
(the workdir of a finished `reward_model` run), the learned reward it optimises instead,
beta = `po.beta`, and log-probabilities under the sampled (grammar-masked) distribution:

* `grpo` (Shao et al., arXiv 2402.03300, eq. 3 and section 4.1.2, outcome supervision), one
  update per rollout (pi_old = pi_theta held constant):
      A_i = (r_i - mean_group r) / (std_group r + 1e-4),
      L = -mean_i (1/|o_i|) sum_t [min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta k3_t],
      rho_t = pi_theta(o_t) / pi_old(o_t),  k3_t = exp(q_t) - q_t - 1,  q_t = log pi_ref(o_t) - log pi_theta(o_t)
  (`grpo_loss`; eps = `po.clip_eps`; k3 is Schulman's unbiased, non-negative KL estimator).
* `rloo` (Ahmadian et al., arXiv 2402.14740, eq. 6): REINFORCE with the leave-one-out baseline on
  the KL-penalised sequence reward r'_i = r_i - beta (log pi_theta(y_i) - log pi_ref(y_i)) (held
  constant):  L = -mean_i (r'_i - mean_{j != i} r'_j) log pi_theta(y_i)   (`rloo_loss`).
* `online_dpo` (Guo et al., arXiv 2402.04792): per prompt two responses of the current policy
  (G = 2), labelled by a Bradley-Terry draw on the true reward at `po.pairs.bt_temperature` (as the
  offline pairs), trained with the registry loss `po.loss` (default dpo) against the SFT reference.

Evaluation and results.json are the 'po' objective's (`language.PreferenceObjective.evaluate`),
so the three share synthetic_dpo.py's keys; the offline SFT pairs are still built for the pair
metrics. Training metrics: `reward` (mean optimised reward of the step's samples), `true_reward`
(the same samples' true reward: the two differ with a learned reward model), `kl` (mean sequence
log-ratio to the reference), `length` (words), and each method's own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.data import preference as prefdata
from fdistill.models.transformer import generate
from fdistill.objectives import preference as prefloss
from fdistill.objectives.base import register
from fdistill.objectives.language import PreferenceObjective
from fdistill.sharding import process_slice


# ----------------------------------------------------------------------------------------------
# Pieces (pure functions, tested one by one)
# ----------------------------------------------------------------------------------------------
def response_mask(tokens: jax.Array) -> jax.Array:
    """1 on the response tokens up to and including the first EOS, [B, seq_len] float32 (the loss
    mask `SyntheticLanguage.sequences` writes)."""
    _, num_words, _ = prefdata.response_words(tokens)
    pos = jnp.arange(tokens.shape[1])[None]
    return ((pos >= prefdata.PROMPT_LEN) & (pos <= prefdata.PROMPT_LEN + num_words[:, None])).astype(jnp.float32)


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
    """GRPO's outcome advantages: (r - group mean) / (group std + eps), groups = consecutive
    `group_size` rows ([P * G] -> [P * G])."""
    r = rewards.reshape(-1, group_size)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)).reshape(-1)


def leave_one_out_baseline(rewards: jax.Array, group_size: int) -> jax.Array:
    """RLOO's baseline: the mean reward of the *other* G - 1 samples of the same prompt."""
    r = rewards.reshape(-1, group_size)
    return ((r.sum(1, keepdims=True) - r) / (group_size - 1)).reshape(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, beta: float):
    """GRPO's loss (module docstring) from per-token log-probabilities [B, T] of the policy, the
    sampling policy and the reference, sequence advantages [B] and the token mask [B, T]. Returns
    (loss, metrics: clip_frac, k3 (mean per-token KL estimate))."""
    ratio = jnp.exp(logp - old_logp)
    a = advantages[:, None]
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    q = ref_logp - logp
    k3 = jnp.exp(q) - q - 1.0
    per_seq = jnp.sum((surrogate - beta * k3) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    clipped = (jnp.abs(ratio - 1.0) > clip_eps) & (mask > 0)
    return -jnp.mean(per_seq), {"clip_frac": jnp.sum(clipped) / n, "k3": jnp.sum(k3 * mask) / n}


def rloo_loss(seq_logp, seq_ref_logp, rewards, group_size: int, beta: float):
    """RLOO's loss (module docstring) from sequence log-probabilities [B] (policy, reference) and
    rewards [B]. Returns (loss, metrics: penalised_reward, advantage_abs)."""
    penalised = jax.lax.stop_gradient(rewards - beta * (seq_logp - seq_ref_logp))
    adv = penalised - leave_one_out_baseline(penalised, group_size)
    return -jnp.mean(adv * seq_logp), {"penalised_reward": jnp.mean(penalised), "advantage_abs": jnp.mean(jnp.abs(adv))}


# ----------------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------------
class OnPolicyObjective(PreferenceObjective):
    """Shared by GRPO, RLOO and online DPO: prompts per step, the in-step rollout and scoring."""

    group_size_fixed: int | None = None  # online DPO: 2

    def __init__(self, config):
        po = config.po
        g = int(self.group_size_fixed or po.group_size)
        if g < 2:
            raise ConfigError(f"config.po.group_size must be >= 2 (a group needs a baseline), got {po.group_size}")
        if not 0 < float(po.clip_eps) < 1:
            raise ConfigError(f"config.po.clip_eps must be in (0, 1), got {po.clip_eps}")
        if int(config.train.grad_accum_steps) != 1:
            raise ConfigError(f"config.train.grad_accum_steps={config.train.grad_accum_steps}: the on-policy objectives "
                             "sample their batch inside the step and do not accumulate; use 1")
        super().__init__(config)
        self.group_size, self.clip_eps = g, float(po.clip_eps)
        self.temperature = float(po.pairs.sample_temperature)
        self.bias = jnp.asarray(self.task.grammar_bias())

    # ----- data: prompts only ---------------------------------------------------------------
    def batch(self, step, process_index=0, process_count=1):
        """This process's slice of the step's `train.batch_size` training prompts ((seed, step) only)."""
        n = int(self.config.train.batch_size)
        rng = np.random.default_rng([int(self.config.train.seed), 10, int(step)])
        prompts = self.task.train_prompts[rng.integers(0, len(self.task.train_prompts), n)]
        return {"prompts": prompts[process_slice(n, process_index, process_count)]}

    # ----- rollout ----------------------------------------------------------------------------
    def rollout(self, params, prompts, key):
        """G responses per prompt from the current policy, held constant: (tokens [P G, T], mask)."""
        rep = jnp.repeat(prompts, self.group_size, axis=0)
        tokens, _ = generate(self.model, jax.lax.stop_gradient(params), rep, key, self.task.seq_len, self.temperature,
                             self.bias, prefdata.EOS, prefdata.PAD)
        tokens = jax.lax.stop_gradient(tokens)
        return tokens, response_mask(tokens)

    def token_logps(self, params, tokens, mask):
        """Per-token log-probabilities under the sampled (grammar-masked) distribution, [B, T - 1]."""
        logits = self.model.apply({"params": params}, tokens) + self.bias[None, : tokens.shape[1]]
        return prefloss.token_logps(logits, tokens, mask)

    def rollout_metrics(self, tokens, mask, rewards, logp, ref_logp):
        return {"reward": jnp.mean(rewards), "kl": jnp.mean(jnp.sum(logp - ref_logp, 1)),
                "length": jnp.mean(jnp.sum(mask, 1) - 1.0)}

    def on_policy_loss(self, params, ref_params, tokens, mask, rewards, key):
        raise NotImplementedError

    def train_step(self, state, frozen, batch):
        key = ts.step_key(state)
        tokens, mask = self.rollout(state.params, batch["prompts"], jax.random.fold_in(key, 0))
        true = self.task.sequence_reward(tokens)
        rewards = true if self.proxy_reward is None else self.proxy_reward(frozen["reward_model"], tokens)
        loss_fn = lambda p: self.on_policy_loss(p, frozen["ref"], tokens, mask, rewards, jax.random.fold_in(key, 1))
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics["true_reward"] = jnp.mean(true)  # = reward, unless a learned reward model is optimised
        state, opt_metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {**metrics, **opt_metrics}


@register("grpo", family="po")
class GRPOObjective(OnPolicyObjective):
    """GRPO (module docstring): `po.group_size` samples per prompt, `po.clip_eps`, `po.beta` (k3 weight)."""

    def on_policy_loss(self, params, ref_params, tokens, mask, rewards, key):
        logp = self.token_logps(params, tokens, mask)
        ref_logp = jax.lax.stop_gradient(self.token_logps(ref_params, tokens, mask))
        adv = group_advantages(rewards, self.group_size)
        loss, m = grpo_loss(logp, jax.lax.stop_gradient(logp), ref_logp, adv, mask[:, 1:], self.clip_eps, self.beta)
        return loss, {"loss": loss, **m, **self.rollout_metrics(tokens, mask, rewards, logp, ref_logp)}


@register("rloo", family="po")
class RLOOObjective(OnPolicyObjective):
    """RLOO (module docstring): `po.group_size` samples per prompt, `po.beta` (KL penalty)."""

    def on_policy_loss(self, params, ref_params, tokens, mask, rewards, key):
        logp = self.token_logps(params, tokens, mask)
        ref_logp = jax.lax.stop_gradient(self.token_logps(ref_params, tokens, mask))
        loss, m = rloo_loss(jnp.sum(logp, 1), jnp.sum(ref_logp, 1), rewards, self.group_size, self.beta)
        return loss, {"loss": loss, **m, **self.rollout_metrics(tokens, mask, rewards, logp, ref_logp)}


@register("online_dpo", family="po")
class OnlineDPOObjective(OnPolicyObjective):
    """Online DPO (module docstring): two samples per prompt, a Bradley-Terry label on the true
    reward, any registry loss `po.loss` against the SFT reference."""

    group_size_fixed = 2

    def on_policy_loss(self, params, ref_params, tokens, mask, rewards, key):
        logp = self.token_logps(params, tokens, mask)
        ref_logp = jax.lax.stop_gradient(self.token_logps(ref_params, tokens, mask))
        seq, ref_seq = jnp.sum(logp, 1).reshape(-1, 2), jnp.sum(ref_logp, 1).reshape(-1, 2)
        r = rewards.reshape(-1, 2)
        lengths = jnp.sum(mask, 1).reshape(-1, 2)
        p_first = jax.nn.sigmoid((r[:, 0] - r[:, 1]) / float(self.config.po.pairs.bt_temperature))
        first_wins = jax.random.bernoulli(key, p_first)
        chosen = lambda x: jnp.where(first_wins, x[:, 0], x[:, 1])
        rejected = lambda x: jnp.where(first_wins, x[:, 1], x[:, 0])
        per_pair, m = prefloss.preference_loss(
            self.loss_name, chosen(seq), rejected(seq), chosen(ref_seq), rejected(ref_seq), chosen(lengths),
            rejected(lengths), beta=self.beta, **self.pair_loss.params)
        loss = jnp.mean(per_pair)
        m = {**m, "reward_gap": jnp.mean(chosen(r) - rejected(r))}
        return loss, {"loss": loss, **m, **self.rollout_metrics(tokens, mask, rewards, logp, ref_logp)}
