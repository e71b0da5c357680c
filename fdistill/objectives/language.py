"""Language-model objectives on the known-reward synthetic language (`fdistill.data.preference`).

* `'sft'`: supervised fine-tuning, i.e. next-token cross-entropy on demonstrator responses,
      L(theta) = - sum_{b, t} m_{b,t} log p_theta(y_{b,t} | y_{b,<t}) / sum_{b, t} m_{b,t},
  with m the response mask (prompt and padding excluded), averaged over the global batch's tokens
  (also with gradient accumulation: every micro-batch divides by the full batch's token count).
* `'po'`: preference optimisation of the SFT policy on pairs of its own responses labelled by the
  true reward, with any loss of the preference registry `fdistill.objectives.preference`
  (`config.po.loss`). The SFT policy, a finished 'sft' run named by `config.po.sft_workdir`
  (`fdistill.runs`; `python -m experiments.prepare` trains it), is the frozen reference
  (`frozen['ref']`) and the initial policy; its task and model must equal `config.task` and
  `config.model`. With `po.precompute_ref=True` the reference log-probabilities of every pair are
  computed once (jitted) when the objective is built and travel in the batch; otherwise the step
  computes them from `frozen['ref']`. `po.reference='init'` needs no SFT run: a randomly
  initialised reference of `config.model` on `config.task`, with pairs of demonstrator responses.

Both objectives use the shared update path (`fdistill.train_state`: AdamW, clipping, EMA,
gradient accumulation over `config.train.grad_accum_steps` micro-batches).

Sequences are [BOS, a, b, SEP, words..., EOS, PAD...]; log-probabilities are summed over the
response tokens (words and EOS), lengths count them. For benchmarks, `build_po_setup(config)`
returns (objective, state, frozen, batch) ready for `objective.train_step`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import runs
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.data import preference as prefdata
from fdistill.evaluation import preference as prefeval
from fdistill.models import param_count
from fdistill.models.transformer import TransformerLM, generate
from fdistill.objectives import preference as prefloss
from fdistill.objectives.base import Objective, register

REFERENCES = ("sft", "init")
MODEL_FIELDS = ("width", "depth", "num_heads", "mlp_ratio")


# ----------------------------------------------------------------------------------------------
# Model, sampling and scoring
# ----------------------------------------------------------------------------------------------
def build_model(model_config, task: prefdata.SyntheticLanguage, compute_dtype: str = "float32") -> TransformerLM:
    """The decoder-only LM of `config.model` sized for `task` (vocabulary and context from the task)."""
    from fdistill import models

    if model_config.name != "transformer":
        raise ConfigError(f"config.model.name={model_config.name!r} is not supported by the language objectives; "
                         f"allowed: ['transformer']")
    kw = {k: int(model_config[k]) for k in MODEL_FIELDS}
    for k, v in kw.items():
        if v <= 0:
            raise ConfigError(f"config.model.{k} must be positive, got {v}")
    if kw["width"] % kw["num_heads"]:
        raise ConfigError(f"config.model.width={kw['width']} is not divisible by config.model.num_heads={kw['num_heads']}")
    return TransformerLM(vocab_size=task.vocab_size, max_len=task.seq_len, dtype=models.compute_dtype(compute_dtype),
                         **kw)


_POLICY_FNS: dict = {}


class LMPolicy:
    """Jitted sampling and scoring of a `TransformerLM` on `task`, in fixed-size chunks.

    Sampling and `score` use the task's grammar (responses are words then EOS), so the log-probs
    they return are those of the distribution actually sampled; `logps` (used by the training
    losses) scores with the raw softmax. The jitted functions are shared by every policy with the
    same model and task (one compile per process, e.g. for all the runs of a table)."""

    def __init__(self, model: TransformerLM, task: prefdata.SyntheticLanguage, chunk: int = 1024):
        self.model, self.task, self.chunk = model, task, int(chunk)
        bias_np = task.grammar_bias()
        cache_key = (repr(model), hashlib.sha256(bias_np.tobytes()).hexdigest())
        if cache_key not in _POLICY_FNS:
            bias, T = jnp.asarray(bias_np), task.seq_len

            def sample(params, prompts, key, temperature):
                """temperature > 0: sampling; temperature == 0: greedy (one compiled function)."""
                run = lambda greedy: generate(model, params, prompts, key, T, temperature, bias, prefdata.EOS,
                                              prefdata.PAD, greedy=greedy)
                return jax.lax.cond(temperature > 0, lambda: run(False), lambda: run(True))

            def score(params, tokens, mask, biased):
                logits = model.apply({"params": params}, tokens)
                if biased:
                    logits = logits + bias[None, : tokens.shape[1]]
                return prefloss.sequence_logps(logits, tokens, mask)

            _POLICY_FNS[cache_key] = (jax.jit(sample), jax.jit(score, static_argnames=("biased",)))
        self._sample, self._score = _POLICY_FNS[cache_key]

    def _chunks(self, n):
        return [(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]

    @staticmethod
    def _pad(x, size):
        x = np.asarray(x)
        if len(x) == size:
            return x
        return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])

    def sample(self, params, prompts: np.ndarray, key, temperature: float = 1.0, greedy: bool = False):
        """(tokens [n, T], logp [n]) of one response per prompt row (NumPy); greedy decoding when
        `greedy` (logp is then that of the greedy response under the policy)."""
        toks, lps = [], []
        t = jnp.float32(0.0 if greedy else temperature)
        for i, (s, e) in enumerate(self._chunks(len(prompts))):
            p = jnp.asarray(self._pad(prompts[s:e], self.chunk))
            tok, lp = self._sample(params, p, jax.random.fold_in(key, i), t)
            toks.append(np.asarray(tok)[: e - s])
            lps.append(np.asarray(lp)[: e - s])
        return np.concatenate(toks), np.concatenate(lps)

    def _scored(self, params, tokens, mask, biased):
        out = []
        for s, e in self._chunks(len(tokens)):
            lp = self._score(params, jnp.asarray(self._pad(tokens[s:e], self.chunk)),
                             jnp.asarray(self._pad(mask[s:e], self.chunk)), biased)
            out.append(np.asarray(lp)[: e - s])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def score(self, params, tokens: np.ndarray) -> np.ndarray:
        """Grammar-constrained log-probability of each generated sequence's response."""
        words, num = self.task.split_responses(tokens)
        _, mask, _ = self.task.sequences(tokens[:, : prefdata.PROMPT_LEN], words, num)
        return self._scored(params, tokens, mask, True)

    def logps(self, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Raw (unconstrained) summed response log-probabilities, as the training losses see them."""
        return self._scored(params, tokens, mask, False)


@dataclasses.dataclass(frozen=True)
class PairLoss:
    """A preference loss of the registry (`fdistill.objectives.preference`) on a batch of pairs of an
    LM `model`: chosen/rejected `*_tokens`, `*_mask` (1 on the scored response tokens), `*_lengths`,
    and optionally the precomputed `ref_chosen_logps` / `ref_rejected_logps`.

    `loss(params, ref_params, batch) -> (mean loss, metrics)` (TRL's metric names); the reference
    log-probabilities come from the batch when precomputed, else from `ref_params` (no gradient)."""

    model: Any
    name: str
    beta: float
    params: dict

    @classmethod
    def from_section(cls, model, section) -> "PairLoss":
        """From a config section with `loss`, `beta` and the loss parameters (`config.po`)."""
        return cls(model, section.loss, float(section.beta), prefloss.params_from(section))

    @property
    def reference_free(self) -> bool:
        return prefloss.is_reference_free(self.name)

    def pair_logps(self, params, batch):
        """(chosen logps, rejected logps) with one forward pass over both responses."""
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
        logps = prefloss.sequence_logps(self.model.apply({"params": params}, tokens), tokens, mask)
        n = batch["chosen_tokens"].shape[0]
        return logps[:n], logps[n:]

    def reference_logps(self, ref_params, batch):
        if self.reference_free:
            return None, None
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        return jax.lax.stop_gradient(self.pair_logps(ref_params, batch))

    def __call__(self, params, ref_params, batch):
        pi_w, pi_l = self.pair_logps(params, batch)
        ref_w, ref_l = self.reference_logps(ref_params, batch)
        per_pair, metrics = prefloss.preference_loss(
            self.name, pi_w, pi_l, ref_w, ref_l, batch["chosen_lengths"], batch["rejected_lengths"],
            beta=self.beta, **self.params)
        loss = jnp.mean(per_pair)
        metrics["loss"] = loss
        return loss, metrics


def init_params(model: TransformerLM, key) -> dict:
    """Fresh parameters (initialised under jit: eager Flax init compiles every op separately)."""
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, model.max_len), jnp.int32))["params"])(key)


def num_tokens(loss_mask) -> jax.Array:
    """The number of scored (masked) tokens of a batch, at least 1."""
    return jnp.maximum(jnp.sum(loss_mask[:, 1:].astype(jnp.float32)), 1.0)


def token_nll(model, params, tokens, loss_mask, denominator=None) -> jax.Array:
    """Next-token NLL summed over the masked response tokens, divided by `denominator` (default:
    their number, i.e. the mean over the batch's tokens)."""
    logits = model.apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    m = loss_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(tok * m) / (num_tokens(loss_mask) if denominator is None else denominator)


def sft_value_and_grad(model, params, batch, num_micro: int = 1):
    """(token-mean NLL of the batch, its gradient) over `num_micro` micro-batches: each divides by
    the *full* batch's token count / num_micro, so their mean is exactly the full batch's token mean."""
    denominator = num_tokens(batch["loss_mask"]) / num_micro
    loss_fn = lambda p, x: token_nll(model, p, x["tokens"], x["loss_mask"], denominator)
    return ts.value_and_grad(loss_fn, params, batch, num_micro)


def _eval_prompts(task, samples_per_prompt: int) -> np.ndarray:
    if samples_per_prompt < 1:
        raise ConfigError(f"config.eval.samples_per_prompt must be >= 1, got {samples_per_prompt}")
    return np.repeat(task.heldout_prompts, samples_per_prompt, axis=0)


def _key_bytes(key) -> bytes:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).tobytes()


def _plot_lengths(path: str, title: str, series: dict[str, tuple[np.ndarray, np.ndarray]], max_words: int) -> str:
    """Histogram of response lengths and mean true reward per length, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    bins = np.arange(0, max_words + 1)
    for name, (lengths, rewards) in series.items():
        counts = np.array([np.mean(lengths == b) for b in bins])
        axes[0].plot(bins, counts, marker="o", label=name)
        mean_r = [np.mean(rewards[lengths == b]) if np.any(lengths == b) else np.nan for b in bins]
        axes[1].plot(bins, mean_r, marker="o", label=name)
    axes[0].set(xlabel="response length (words)", ylabel="fraction")
    axes[1].set(xlabel="response length (words)", ylabel="mean true reward")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------
@register("sft")
class SFTObjective(Objective):
    """Next-token training on the synthetic demonstrator (config.task, config.model, config.train,
    config.eval); evaluates the held-out NLL and the true reward of sampled responses."""

    def __init__(self, config):
        super().__init__(config)
        self.task = prefdata.SyntheticLanguage(config.task)
        self.model = build_model(config.model, self.task, config.train.compute_dtype)
        self.policy = LMPolicy(self.model, self.task, config.eval.chunk)
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train))
        self.num_micro = ts.check_grad_accum(config.train.grad_accum_steps, config.train.batch_size)
        self.heldout = self.task.heldout_demonstrations(config.eval.num_heldout)
        self._nll = jax.jit(lambda p, t, m: token_nll(self.model, p, t, m))

    def init_state(self, key, frozen):
        k_init, k_rng = jax.random.split(key)
        return ts.create_state(init_params(self.model, k_init), self.optimizer, k_rng)

    def train_step(self, state, frozen, batch):
        loss, grads = sft_value_and_grad(self.model, state.params, batch, self.num_micro)
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, **metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.task.sft_batch(step, self.config.train.batch_size, self.config.train.seed, process_index,
                                   process_count)

    def evaluate(self, state, frozen, key):
        e = self.config.eval
        params = ts.eval_params(state, use_ema=e.use_ema)
        h = self.heldout
        metrics = {"nll_heldout": float(self._nll(params, jnp.asarray(h["tokens"]), jnp.asarray(h["loss_mask"]))),
                   "demo/true_reward": float(np.mean(h["reward"])),
                   "demo/mean_length": float(np.mean(h["num_words"])),
                   "best_reward": self.task.best_reward(),
                   "num_params": float(param_count(params))}
        prompts = _eval_prompts(self.task, int(e.samples_per_prompt))
        tokens, _ = self.policy.sample(params, prompts, key, float(e.temperature))
        m, r = prefeval.response_metrics(self.task, prompts, tokens)
        metrics.update(m)
        gtokens, _ = self.policy.sample(params, self.task.heldout_prompts, key, greedy=True)
        metrics["greedy/true_reward"] = prefeval.response_metrics(self.task, self.task.heldout_prompts, gtokens)[0][
            "true_reward"]
        self._last = {"policy": (self.task.split_responses(tokens)[1], r),
                      "demonstrator": (h["num_words"], h["reward"])}
        return metrics

    def plot(self, state, frozen, plot_dir, step):
        if not hasattr(self, "_last"):
            return []
        return [_plot_lengths(os.path.join(plot_dir, f"lengths_{step:07d}.png"), f"SFT policy, step {step}",
                              self._last, self.task.response_len - 1)]


# ----------------------------------------------------------------------------------------------
# Preference optimisation
# ----------------------------------------------------------------------------------------------
def validate_po_config(config) -> None:
    """Fails at start-up naming the bad field and the allowed values."""
    po = config.po
    prefloss.check_params(po.loss, po.beta, prefloss.params_from(po), section="config.po")
    if po.reference not in REFERENCES:
        raise ConfigError(f"config.po.reference={po.reference!r} is not known; allowed: {list(REFERENCES)}")
    for f in ("num_pairs", "num_test_pairs", "bt_temperature", "sample_temperature"):
        if not po.pairs[f] > 0:
            raise ConfigError(f"config.po.pairs.{f} must be positive, got {po.pairs[f]}")
    if config.train.batch_size > int(po.pairs.num_pairs):
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} exceeds "
                         f"config.po.pairs.num_pairs={po.pairs.num_pairs}")


def pairs_spec(config, sft: runs.FinishedRun) -> dict:
    """Everything that determines the preference pairs (hashed into the dataset name)."""
    return {"sft_workdir": sft.workdir, "sft_step": sft.results["step"], "task": sft.config.task.to_dict(),
            "model": sft.config.model.to_dict(), "pairs": config.po.pairs.to_dict(), "format": 1}


def ensure_pairs(config, sft: runs.FinishedRun, task, policy: LMPolicy, ref_params: Callable) -> dict[str, dict]:
    """{split: arrays} of the preference dataset for this SFT policy and `config.po.pairs`, written
    first (by process 0) as a local TFDS dataset when absent (`ref_params()`, the SFT policy's
    parameters, is called only then):

        prompts ~ Uniform(training prompts) ('train') or Uniform(held-out prompts) ('test'),
        y_a, y_b ~ pi_SFT(. | x) at `sample_temperature`, Bradley-Terry label on the true reward.

    The dataset lives in `config.po.data_dir` (default `<sft workdir>/preference_data`) under a name
    hashing `pairs_spec`, so it is deterministic and reused by every loss.
    """
    pc = config.po.pairs
    spec = json.dumps(pairs_spec(config, sft), sort_keys=True, default=str)
    name = "p" + hashlib.sha256(spec.encode()).hexdigest()[:12]
    data_dir = config.po.data_dir or os.path.join(sft.workdir, "preference_data")
    if not prefdata.is_prepared(data_dir, name):
        if jax.process_index() == 0:
            t0 = time.perf_counter()
            seed = int(pc.seed)
            records = {}
            for i, (split, pool, n) in enumerate((("train", task.train_prompts, int(pc.num_pairs)),
                                                  ("test", task.heldout_prompts, int(pc.num_test_pairs)))):
                rng = np.random.default_rng([seed, 8, i])
                prompts = pool[rng.integers(0, len(pool), n)]
                key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
                t_a, _ = policy.sample(ref_params(), prompts, jax.random.fold_in(key, 0), float(pc.sample_temperature))
                t_b, _ = policy.sample(ref_params(), prompts, jax.random.fold_in(key, 1), float(pc.sample_temperature))
                pairs = prefdata.make_pairs(task, prompts, t_a, t_b, float(pc.bt_temperature), seed + 1000 * i)
                records[split] = prefdata.to_records(pairs)
            path = prefdata.write_pairs(data_dir, name, records, spec)
            with open(os.path.join(path, "spec.json"), "w") as f:
                f.write(spec)
            print(f"[fdistill] wrote {pc.num_pairs} + {pc.num_test_pairs} preference pairs to {path} "
                  f"in {time.perf_counter() - t0:.1f}s", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fdistill_lm_preference_pairs_written")
    arrays = prefdata.read_pairs(data_dir, name, task)
    arrays["_path"] = os.path.join(data_dir, "synthetic_preference_pairs", name)
    return arrays


def demonstrator_pairs(config, task) -> dict[str, dict]:
    """In-memory pairs of demonstrator responses (for `po.reference='init'`: no SFT run, no TFDS)."""
    pc = config.po.pairs
    out = {}
    for i, (split, pool, n) in enumerate((("train", task.train_prompts, int(pc.num_pairs)),
                                          ("test", task.heldout_prompts, int(pc.num_test_pairs)))):
        rng = np.random.default_rng([int(pc.seed), 9, i])
        prompts = pool[rng.integers(0, len(pool), n)]
        seqs = []
        for _ in range(2):
            words, num = task.demonstrations(rng, prompts)
            seqs.append(task.sequences(prompts, words, num)[0])
        pairs = prefdata.make_pairs(task, prompts, seqs[0], seqs[1], float(pc.bt_temperature), int(pc.seed) + 1000 * i)
        out[split] = prefdata.records_to_arrays(prefdata.to_records(pairs), task, f"demonstrator pairs {split}")
    out["_path"] = "<in-memory demonstrator pairs>"
    return out


@register("po")
class PreferenceObjective(Objective):
    """Preference optimisation (config.po.loss) of the SFT policy against itself as reference.

    config.po: loss, beta and the loss parameters (label_smoothing, gamma, alpha, lambda_, ...),
    precompute_ref, reference ('sft' | 'init'), sft_workdir, init_seed, data_dir, pairs.
    """

    def __init__(self, config):
        super().__init__(config)
        validate_po_config(config)
        po = config.po
        self.loss_name, self.beta = po.loss, float(po.beta)
        self.precompute_ref = bool(po.precompute_ref)
        self.task = prefdata.SyntheticLanguage(config.task)
        self.model = build_model(config.model, self.task, config.train.compute_dtype)
        self.pair_loss = PairLoss.from_section(self.model, po)
        self.reference_free = self.pair_loss.reference_free
        self.policy = LMPolicy(self.model, self.task, config.eval.chunk)
        if po.reference == "sft":
            self.sft = runs.open_dependency(config, "po.sft_workdir")
            self.ref_params = runs.stored_params(self.sft)  # read onto its shardings by the loop
            host_ref = functools.cache(self.ref_params.numpy)  # read to host only if pairs or log-probs are made here
            arrays = ensure_pairs(config, self.sft, self.task, self.policy, host_ref)
        else:  # 'init': a randomly initialised reference, demonstrator pairs (benchmarks, quick tests)
            self.sft = None
            self.ref_params = init_params(self.model, jax.random.PRNGKey(int(po.init_seed)))
            host_ref = lambda: self.ref_params
            arrays = demonstrator_pairs(config, self.task)
        self.proxy_reward, self.proxy_params = None, None
        if po.reward_model:  # optimise against a learned reward: its Bradley-Terry labels on the training pairs
            from fdistill.objectives import reward_model

            fn, self.proxy_params = reward_model.load(runs.open_dependency(config, "po.reward_model"))
            self.proxy_reward = jax.jit(fn)
            train = arrays["train"]
            seqs = [self.task.sequences(train["prompt"], train[f], train[f"{f}_words"])[0] for f in ("chosen", "rejected")]
            proxy = [np.asarray(self.proxy_reward(self.proxy_params, jnp.asarray(t))) for t in seqs]
            arrays = {**arrays, "train": prefdata.relabel_pairs(train, *proxy, float(po.pairs.bt_temperature),
                                                                int(po.pairs.seed))}
        seed = int(config.train.seed)
        self.pairs = prefdata.PreferencePairs(arrays["train"], self.task, seed, arrays["_path"])
        self.test_pairs = prefdata.PreferencePairs(arrays["test"], self.task, seed, arrays["_path"])
        if self.precompute_ref and not self.reference_free:
            for pairs in (self.pairs, self.test_pairs):
                pairs.set_reference_logps(*self._dataset_logps(host_ref(), pairs))
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train))
        self.num_micro = ts.check_grad_accum(config.train.grad_accum_steps, config.train.batch_size)
        self._pair_metrics = jax.jit(self._metrics_on_rows)

    # ----- pieces -----------------------------------------------------------------------------
    def _dataset_logps(self, params, pairs: prefdata.PreferencePairs):
        x = pairs.inputs
        return (self.policy.logps(params, x["chosen_tokens"], x["chosen_mask"]),
                self.policy.logps(params, x["rejected_tokens"], x["rejected_mask"]))

    def loss(self, params, ref_params, batch):
        return self.pair_loss(params, ref_params, batch)

    def _metrics_on_rows(self, params, ref_params, rows):
        return self.loss(params, ref_params, rows)[1]

    # ----- contract ---------------------------------------------------------------------------
    def frozen(self):
        frozen = {"ref": self.ref_params}
        if self.proxy_params is not None:
            frozen["reward_model"] = self.proxy_params
        return frozen

    def init_state(self, key, frozen):
        return ts.create_state(jax.tree.map(jnp.array, frozen["ref"]), self.optimizer, key)

    def train_step(self, state, frozen, batch):
        loss_fn = lambda p, x: self.loss(p, frozen["ref"], x)
        (_, metrics), grads = ts.value_and_grad(loss_fn, state.params, batch, self.num_micro, has_aux=True)
        state, opt_metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {**metrics, **opt_metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.pairs.batch(step, self.config.train.batch_size, process_index, process_count)

    # ----- evaluation -------------------------------------------------------------------------
    def evaluate(self, state, frozen, key):
        e = self.config.eval
        params, ref = ts.eval_params(state, use_ema=e.use_ema), frozen["ref"]
        prompts = _eval_prompts(self.task, int(e.samples_per_prompt))
        temperature = float(e.temperature)
        sample = lambda p, x, k: self.policy.sample(p, x, k, temperature)
        cache = (len(prompts), temperature, _key_bytes(key))
        ref_samples = self._ref_samples if getattr(self, "_ref_cache", None) == cache else None
        metrics, (pol_tokens, pol_r), ref_samples = prefeval.evaluate_policy(self.task, sample, self.policy.score, params, ref, prompts,
                                                        key, ref_samples)
        self._ref_samples, self._ref_cache = ref_samples, cache
        # the same number of rows from both splits: one compiled metrics function
        n_rows = min(int(e.num_pairs), self.pairs.num_pairs, self.test_pairs.num_pairs)
        for prefix, pairs in (("", self.pairs), ("heldout/", self.test_pairs)):
            rows = {k: jnp.asarray(v) for k, v in pairs.rows(np.arange(n_rows)).items()}
            for k, v in self._pair_metrics(params, ref, rows).items():
                metrics[prefix + k] = float(v)
        if self.proxy_reward is not None:
            proxy = self.proxy_reward(frozen["reward_model"], jnp.asarray(pol_tokens))
            metrics["proxy_reward"] = float(np.mean(np.asarray(proxy)))
        metrics["best_reward"] = self.task.best_reward()
        metrics.update({f"pairs/{k}": v for k, v in self.pairs.stats().items()})
        tokens, _ = self.policy.sample(params, self.task.heldout_prompts, key, greedy=True)
        metrics["greedy/true_reward"] = prefeval.response_metrics(self.task, self.task.heldout_prompts, tokens)[0][
            "true_reward"]
        self._last = {"policy": (self.task.split_responses(pol_tokens)[1], pol_r),
                      "reference": (self.task.split_responses(ref_samples[0])[1], ref_samples[1])}
        return metrics

    def plot(self, state, frozen, plot_dir, step):
        if not hasattr(self, "_last"):
            return []
        title = f"{self.loss_name} (beta={self.beta:g}), step {step}"
        return [_plot_lengths(os.path.join(plot_dir, f"lengths_{step:07d}.png"), title, self._last,
                              self.task.response_len - 1)]


@register("kto", family="po")
class KTOObjective(PreferenceObjective):
    """KTO (arXiv 2402.01306; `preference.kto_loss`) of the SFT policy on the preference data
    unpaired (`prefdata.UnpairedExamples`: chosen = desirable, rejected = undesirable, the same
    Bradley-Terry labels). config.po: beta, desirable_weight (lambda_D), undesirable_weight
    (lambda_U); `po.loss` is not read. The reference log-probabilities are computed in the step
    (the KL completions change with every batch), so `po.precompute_ref` must be False.
    `config.train.batch_size` counts examples (a pair gives two). Evaluation is the 'po' one: the
    same samples and true reward, and the pair metrics (held-out accuracy) of the implicit reward
    beta (pi - ref) on the same pairs."""

    def __init__(self, config):
        po = config.po
        if po.precompute_ref:
            raise ConfigError("config.po.precompute_ref=True is not supported by objective 'kto' (its KL "
                             "completions change with every batch); set --config.po.precompute_ref=False")
        for f in ("desirable_weight", "undesirable_weight"):
            if not po[f] >= 0:
                raise ConfigError(f"config.po.{f} must be >= 0, got {po[f]}")
        super().__init__(config)
        self.loss_name = "kto"
        self.examples = prefdata.UnpairedExamples(self.pairs)
        self.weights = {"desirable_weight": float(po.desirable_weight),
                        "undesirable_weight": float(po.undesirable_weight)}

    def loss(self, params, ref_params, batch):
        n = batch["tokens"].shape[0]
        tokens = jnp.concatenate([batch["tokens"], batch["kl_tokens"]])
        mask = jnp.concatenate([batch["mask"], batch["kl_mask"]])
        logps = lambda p: prefloss.sequence_logps(self.model.apply({"params": p}, tokens), tokens, mask)
        pi, ref = logps(params), jax.lax.stop_gradient(logps(ref_params))
        per_example, metrics = prefloss.kto_loss(pi[:n], ref[:n], batch["desirable"], pi[n:], ref[n:],
                                                 beta=self.beta, **self.weights)
        loss = jnp.mean(per_example)
        metrics["loss"] = loss
        return loss, metrics

    def _metrics_on_rows(self, params, ref_params, rows):
        pi_w, pi_l = self.pair_loss.pair_logps(params, rows)
        ref_w, ref_l = jax.lax.stop_gradient(self.pair_loss.pair_logps(ref_params, rows))
        return prefloss.trl_metrics(self.beta * (pi_w - ref_w), self.beta * (pi_l - ref_l), pi_w, pi_l)

    def batch(self, step, process_index=0, process_count=1):
        return self.examples.batch(step, self.config.train.batch_size, process_index, process_count)


def build_po_setup(config, key=None):
    """(objective, state, frozen, batch) for `config` (a 'po' config), ready for
    `jax.jit(objective.train_step)(state, frozen, batch)`; with `config.po.reference='init'` nothing
    is trained or written (random reference, demonstrator pairs), which suits speed benchmarks."""
    from fdistill import objectives

    objective = objectives.build(config)
    state, frozen = objective.init(jax.random.PRNGKey(0) if key is None else key)
    batch = {k: jnp.asarray(v) for k, v in objective.batch(0).items()}
    return objective, state, frozen, batch
