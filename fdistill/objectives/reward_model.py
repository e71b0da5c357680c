"""A learned reward model on the synthetic language, for over-optimisation studies: trained from the
Bradley-Terry preference pairs, its error measurable because the true reward is known.

`BagOfWordsReward`: r_phi(x, y) = MLP([onehot(a), onehot(b), presence(y), counts(y) / L, |y| / L]),
with x = [BOS, a, b, SEP], presence/counts over the vocabulary of the response's words (before the
first EOS) and L the response length budget. It can represent the true reward (target hits depend
on the prompt words and the presence of words; the length term on |y|), but learns it from a
finite number of noisy pairs.

Objective `reward_model` (family 'po': the SFT run and the pairs are `synthetic_dpo.py`'s):
    L(phi) = -mean log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))      (Bradley-Terry, Ouyang et al. 2022)
on the first `po.pairs.num_pairs` pairs. Evaluation: `accuracy` (r_phi orders held-out pairs as
their labels), `true_order_accuracy` (as the true reward orders them, ties excluded) and
`true_reward_corr` (Pearson correlation of r_phi with the true reward on SFT samples of held-out
prompts). `load(run)` gives its jit-compatible reward function and parameters to the objectives that
optimise against it (`po.reward_model`; the parameters travel in `frozen['reward_model']`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill import runs
from fdistill import train_state as ts
from fdistill.data import preference as prefdata
from fdistill.objectives.base import register
from fdistill.objectives.language import PreferenceObjective


class BagOfWordsReward(nn.Module):
    """r_phi(tokens [B, seq_len]) -> [B] (module docstring)."""

    vocab_size: int
    response_len: int
    width: int = 128
    depth: int = 2

    @nn.compact
    def __call__(self, tokens):
        resp, num_words, valid = prefdata.response_words(tokens)
        counts = jnp.einsum("bt,btv->bv", valid.astype(jnp.float32), jax.nn.one_hot(resp, self.vocab_size))
        L = float(self.response_len)
        h = jnp.concatenate([jax.nn.one_hot(tokens[:, 1], self.vocab_size), jax.nn.one_hot(tokens[:, 2], self.vocab_size),
                             jnp.minimum(counts, 1.0), counts / L, num_words[:, None].astype(jnp.float32) / L], axis=1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(1)(h)[:, 0]


def build(task: prefdata.SyntheticLanguage, po_config) -> BagOfWordsReward:
    return BagOfWordsReward(task.vocab_size, task.response_len, int(po_config.reward_width), int(po_config.reward_depth))


def load(run: runs.FinishedRun):
    """(reward function (params, tokens [B, T]) -> [B], its parameters) of a finished `reward_model`
    run (open it with `runs.open_dependency(config, 'po.reward_model')`, which checks its task)."""
    model = build(prefdata.SyntheticLanguage(run.config.task), run.config.po)
    return (lambda params, tokens: model.apply({"params": params}, tokens)), runs.restore_params(run)


@register("reward_model", family="po")
class RewardModelObjective(PreferenceObjective):
    """Bradley-Terry reward model on the SFT preference pairs (module docstring); `po.reward_width`,
    `po.reward_depth`: the MLP."""

    def __init__(self, config):
        super().__init__(config)
        self.rm = build(self.task, config.po)
        self.loss_name = "reward_model"

    def init_state(self, key, frozen):
        params = self.rm.init(key, jnp.zeros((1, self.task.seq_len), jnp.int32))["params"]
        return ts.create_state(params, self.optimizer, key)

    def loss(self, params, ref_params, batch):
        r_w = self.rm.apply({"params": params}, batch["chosen_tokens"])
        r_l = self.rm.apply({"params": params}, batch["rejected_tokens"])
        loss = -jnp.mean(jax.nn.log_sigmoid(r_w - r_l))
        return loss, {"loss": loss, "accuracy": jnp.mean((r_w > r_l).astype(jnp.float32)),
                      "margin": jnp.mean(r_w - r_l)}

    def train_step(self, state, frozen, batch):
        loss_fn = lambda p, x: self.loss(p, None, x)
        (_, metrics), grads = ts.value_and_grad(loss_fn, state.params, batch, self.num_micro, has_aux=True)
        state, opt_metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {**metrics, **opt_metrics}

    def evaluate(self, state, frozen, key):
        params = ts.eval_params(state, use_ema=self.config.eval.use_ema)
        reward = jax.jit(lambda t: self.rm.apply({"params": params}, t))
        a = self.test_pairs.arrays
        x = self.test_pairs.inputs
        r_w, r_l = np.asarray(reward(x["chosen_tokens"])), np.asarray(reward(x["rejected_tokens"]))
        true_w, true_l = a["reward_chosen"], a["reward_rejected"]
        strict = ~np.isclose(true_w, true_l)
        prompts = np.repeat(self.task.heldout_prompts, int(self.config.eval.samples_per_prompt), axis=0)
        tokens, _ = self.policy.sample(frozen["ref"], prompts, key)
        words, n = self.task.split_responses(tokens)
        true = self.task.reward(prompts, words, n)
        learned = np.asarray(reward(jnp.asarray(tokens)))
        return {"accuracy": float(np.mean(r_w > r_l)),
                "true_order_accuracy": float(np.mean((r_w > r_l)[strict] == (true_w > true_l)[strict])),
                "true_reward_corr": float(np.corrcoef(learned, true)[0, 1]),
                "num_train_pairs": float(self.pairs.num_pairs)}

    def plot(self, state, frozen, plot_dir, step):
        return []
