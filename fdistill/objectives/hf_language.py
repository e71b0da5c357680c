"""Supervised fine-tuning and preference optimisation of a Hugging Face checkpoint on TRL-format data.

* `'hf_po'`: any loss of the preference registry (`config.po.loss`: dpo, ipo, ln_dpo, simpo, rpo,
  ...; `fdistill.objectives.preference`) on the pairs of a local TRL-format file
  (`config.data.path`, `fdistill.data.hf_preference`), starting from the checkpoint
  `config.model.hf_path` (a Llama, Mistral or Qwen2 directory: config.json, *.safetensors and the
  tokenizer files; `fdistill.models.llama`) or, with `po.sft_workdir`, from a finished 'hf_sft'
  run of the same checkpoint. The starting parameters are the frozen reference (`frozen['ref']`).
  With `po.precompute_ref=True` the reference log-probabilities of every pair are computed once
  before training (jitted, on the default device: for models that fit one); otherwise (TRL's
  default) the step computes them.
* `'hf_sft'`: next-token cross-entropy on the completion tokens of a TRL SFT file
  (`fdistill.data.hf_sft`: `text`, `prompt`/`completion` or `messages`), the token mean over the
  global batch (`fdistill.objectives.language.sft_value_and_grad`).

Both use the shared update path (AdamW, clipping, EMA, gradient accumulation) and the loop's
placement: the checkpoint is read tensor by tensor on the host and placed shard-wise on the mesh
(`config.mesh.fsdp`), so no device holds a full copy of a sharded leaf. The trained copy is kept
in float32 (`model.param_dtype='bfloat16'` stores only the reference in bfloat16); activations are
`train.compute_dtype`. Metrics use TRL's names: `loss`, `rewards/{chosen,rejected,accuracies,margins}`,
`logps/{chosen,rejected}` on training pairs, the same under `heldout/` on held-out pairs (as the
'po' objective; TRL's `eval_` prefix would read `eval/eval_...` in metrics.jsonl).
Evaluation also decodes `eval.num_samples` held-out prompts (KV-cached, `eval.temperature`, 0 =
greedy) and `plot` writes them to `plots/samples_<step>.txt`.
"""
from __future__ import annotations

import abc
import os

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import placement, runs
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.models import compute_dtype, llama, param_count
from fdistill.models.transformer import generate
from fdistill.objectives import preference as prefloss
from fdistill.objectives.base import Objective, register
from fdistill.objectives.language import PairLoss, sft_value_and_grad, token_nll

PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def checkpoint_dir(config) -> str:
    """`config.model.hf_path`, checked to be a checkpoint directory."""
    path = config.model.hf_path
    if not path:
        raise ConfigError("config.model.hf_path is empty: name a Hugging Face checkpoint directory (config.json, "
                         "*.safetensors, tokenizer.json), e.g. --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"config.model.hf_path={path!r} is not a Hugging Face checkpoint directory "
                                f"(no config.json)")
    return path


def data_dir(config) -> str:
    """Where the tokenized dataset is written: `config.data.data_dir`, or beside the data file."""
    return config.data.data_dir or os.path.splitext(os.path.abspath(config.data.path))[0] + "_tfds"


def check_data_path(config) -> None:
    for field in ("path", "test_path"):
        path = config.data[field]
        if field == "path" and not path:
            raise ConfigError("config.data.path is empty: name a local .jsonl or .parquet file in a TRL format")
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"config.data.{field}={path!r} does not exist")


class HFModel:
    """The module, tokenizer and starting parameters of `config.model` (shared by both objectives)."""

    def __init__(self, config):
        from fdistill.data.hf_tokenizer import HFTokenizer

        m = config.model
        if m.param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"config.model.param_dtype={m.param_dtype!r} is not known; allowed: {list(PARAM_DTYPES)}")
        self.path = checkpoint_dir(config)
        self.cfg = llama.read_config(self.path)
        self.module = llama.build(self.cfg, int(config.data.max_length), compute_dtype(config.train.compute_dtype),
                                  bool(m.remat))
        self.tokenizer = HFTokenizer.from_dir(self.path)
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"{self.path}: the tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                             f"model's vocab_size={self.cfg.vocab_size}")
        self.param_dtype = PARAM_DTYPES[m.param_dtype]

    def load(self, sft_run: runs.FinishedRun | None = None):
        """The checkpoint's parameters, or a finished 'hf_sft' run's (its EMA when kept), in
        `param_dtype`, read when placed: straight onto their shardings (`placement.on_mesh`)."""
        if sft_run is None:
            return llama.StoredCheckpoint(self.path, self.module, self.param_dtype)
        return runs.stored_params(sft_run, dtype=self.param_dtype)

    def trainable(self, params):
        """The trained copy of `params`, in float32 (inside jit: created on its shardings)."""
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)

    def sample_text(self, params, tokens: np.ndarray, prompt_lens: np.ndarray, key, max_new_tokens: int,
                    temperature: float) -> list[dict]:
        """Continuations of the prompts `tokens[i, :prompt_lens[i]]` (KV-cached, stopping at EOS), decoded."""
        total = min(self.module.max_len, int(prompt_lens.max()) + int(max_new_tokens))
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or 0)
        out, _ = _generate_fn(self.module, total, eos, pad, temperature <= 0)(
            params, jnp.asarray(tokens[:, :total]), jnp.asarray(prompt_lens, jnp.int32), key,
            jnp.float32(max(temperature, 1e-6)))
        out = np.asarray(out)
        rows = []
        for i, n in enumerate(prompt_lens):
            resp = out[i, n:]
            if eos is not None and np.any(resp == eos):
                resp = resp[: int(np.argmax(resp == eos)) + 1]
            rows.append({"prompt": self.tokenizer.decode(out[i, :n].tolist(), skip_special_tokens=False),
                         "response": self.tokenizer.decode(resp.tolist(), skip_special_tokens=False)})
        return rows


_GENERATE: dict = {}


def _generate_fn(module, total: int, eos, pad: int, greedy: bool):
    """One jitted sampler per (module, length, greedy)."""
    key = (module, total, eos, pad, greedy)
    if key not in _GENERATE:
        _GENERATE[key] = jax.jit(lambda p, x, n, k, t: generate(module, p, x, k, total, t, None, eos, pad,
                                                                greedy=greedy, prefix_len=n))
    return _GENERATE[key]


def prompt_lengths(mask: np.ndarray) -> np.ndarray:
    """The prompt's length of each sequence: the position of its first scored (response) token."""
    return np.argmax(np.asarray(mask) > 0, axis=1)


def write_samples(path: str, title: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.write(title + "\n")
        for i, r in enumerate(rows):
            f.write(f"\n--- sample {i} ---\n[prompt]\n{r['prompt']}\n[response]\n{r['response']}\n")
    return path


class HFObjective(Objective):
    """What 'hf_po' and 'hf_sft' share: the checkpoint and its tokenizer (`HFModel`), the optimiser,
    the settings of the tokenized data, and responses decoded at evaluation (`plots/samples_*.txt`)."""

    def __init__(self, config):
        super().__init__(config)
        check_data_path(config)
        self.hf = HFModel(config)
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train))
        self.num_micro = ts.check_grad_accum(config.train.grad_accum_steps, config.train.batch_size)
        self._samples: list[dict] = []

    def data_settings(self) -> dict:
        """The keyword arguments `hf_preference.prepare` and `hf_sft.prepare_sft` share."""
        d = self.config.data
        return dict(max_length=int(d.max_length), truncation_mode=d.truncation_mode, test_path=d.test_path or None,
                    test_fraction=0.0 if d.test_path else float(d.test_fraction), seed=int(d.seed))

    def check_batch_size(self, num_train: int, what: str) -> None:
        if self.config.train.batch_size > num_train:
            raise ConfigError(f"config.train.batch_size={self.config.train.batch_size} exceeds the {num_train} "
                             f"training {what} of {self.config.data.path}")

    def decode_samples(self, params, tokens: np.ndarray, mask: np.ndarray, key) -> None:
        """Continues the prompts of the rows `tokens` [n, L] (`mask` 1 on their responses) for `plot`."""
        e = self.config.eval
        self._samples = self.hf.sample_text(params, tokens, prompt_lengths(mask), key, int(e.max_new_tokens),
                                            float(e.temperature)) if len(tokens) else []

    @abc.abstractmethod
    def plot_title(self, step: int) -> str:
        """The first line of `plots/samples_<step>.txt`."""

    def plot(self, state, frozen, plot_dir, step):
        if not self._samples:
            return []
        return [write_samples(os.path.join(plot_dir, f"samples_{step:07d}.txt"), self.plot_title(step), self._samples)]


# ----------------------------------------------------------------------------------------------
# Preference optimisation
# ----------------------------------------------------------------------------------------------
@register("hf_po", family="hf")
class HFPreferenceObjective(HFObjective):
    """Preference optimisation of a Hugging Face checkpoint (module docstring)."""

    def __init__(self, config):
        from fdistill.data import hf_preference

        po, d = config.po, config.data
        prefloss.check_params(po.loss, po.beta, prefloss.params_from(po), section="config.po")
        super().__init__(config)
        self.sft = None
        if po.sft_workdir:  # not a `runs.DEPENDENCIES` field: experiments.prepare cannot know the SFT data
            self.sft = runs.open_run(po.sft_workdir, "config.po.sft_workdir", ("hf_sft",), "hf_sft")
            runs.check_shared(config, self.sft, "po.sft_workdir", ("model",))
        self.pair_loss = PairLoss.from_section(self.hf.module, po)
        self.train_pairs, self.test_pairs = hf_preference.prepare(
            d.path, self.hf.tokenizer, data_dir(config), max_prompt_length=d.max_prompt_length,
            max_completion_length=d.max_completion_length, **self.data_settings())
        self.check_batch_size(self.train_pairs.num_pairs, "pairs")
        self._ref = None
        if po.precompute_ref and not self.pair_loss.reference_free:
            self._precompute_reference()
        self._pair_metrics = jax.jit(lambda p, r, rows: self.pair_loss(p, r, rows)[1])

    def _ref_params(self):
        if self._ref is None:
            self._ref = self.hf.load(self.sft)
        return self._ref

    def _precompute_reference(self, chunk: int = 64):
        logps = jax.jit(self.pair_loss.pair_logps)
        ref = jax.tree.map(jnp.asarray, placement.frozen_on_host(self._ref_params()))
        for pairs in (self.train_pairs, self.test_pairs):
            out = [], []
            for s in range(0, pairs.num_pairs, chunk):
                rows = pairs.rows(np.arange(s, min(s + chunk, pairs.num_pairs)))
                for o, v in zip(out, logps(ref, {k: jnp.asarray(v) for k, v in rows.items()})):
                    o.append(np.asarray(v))
            pairs.set_reference_logps(*(np.concatenate(o) if o else np.zeros(0, np.float32) for o in out))

    # ----- contract ---------------------------------------------------------------------------
    def frozen(self):
        return {"ref": self._ref_params()}

    def init_state(self, key, frozen):
        return ts.create_state(self.hf.trainable(frozen["ref"]), self.optimizer, key)

    def train_step(self, state, frozen, batch):
        loss_fn = lambda p, x: self.pair_loss(p, frozen["ref"], x)
        (_, metrics), grads = ts.value_and_grad(loss_fn, state.params, batch, self.num_micro, has_aux=True)
        state, opt_metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {**metrics, **opt_metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.train_pairs.batch(step, self.config.train.batch_size, process_index, process_count)

    def evaluate(self, state, frozen, key):
        e = self.config.eval
        params, ref = ts.eval_params(state, use_ema=e.use_ema), frozen["ref"]
        metrics = {"num_params": float(param_count(params))}
        for prefix, pairs in (("", self.train_pairs), ("heldout/", self.test_pairs)):
            n = min(int(e.num_pairs), pairs.num_pairs)
            sums: dict[str, float] = {}
            for s in range(0, n, self.config.train.batch_size):
                idx = np.arange(s, min(s + self.config.train.batch_size, n))
                m = self._pair_metrics(params, ref, {k: jnp.asarray(v) for k, v in pairs.rows(idx).items()})
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            metrics.update({prefix + k: v / n for k, v in sums.items()} if n else {})
        if not hasattr(self, "_data_stats"):  # reads every record once
            self._data_stats = {f"data/{k}": v for k, v in self.train_pairs.stats().items()}
        metrics.update(self._data_stats)
        source = self.test_pairs if self.test_pairs.num_pairs else self.train_pairs
        rows = source.rows(np.arange(min(int(e.num_samples), source.num_pairs)))
        self.decode_samples(params, rows["chosen_tokens"], rows["chosen_mask"], key)
        return metrics

    def plot_title(self, step: int) -> str:
        return f"{self.config.po.loss} (beta={self.config.po.beta:g}) of {self.hf.path}, step {step}"


# ----------------------------------------------------------------------------------------------
# Supervised fine-tuning
# ----------------------------------------------------------------------------------------------
@register("hf_sft", family="hf")
class HFSFTObjective(HFObjective):
    """Next-token training of a Hugging Face checkpoint on a TRL SFT file (module docstring)."""

    def __init__(self, config):
        from fdistill.data import hf_sft

        super().__init__(config)
        self.train_examples, self.test_examples = hf_sft.prepare_sft(
            config.data.path, self.hf.tokenizer, data_dir(config), **self.data_settings())
        self.check_batch_size(self.train_examples.num_examples, "examples")
        self._nll_sum = jax.jit(lambda p, t, m: token_nll(self.hf.module, p, t, m, denominator=1.0))

    init_only = ("init",)

    def frozen(self):
        return {"init": self.hf.load()}

    def init_state(self, key, frozen):
        return ts.create_state(self.hf.trainable(frozen["init"]), self.optimizer, key)

    def train_step(self, state, frozen, batch):
        loss, grads = sft_value_and_grad(self.hf.module, state.params, batch, self.num_micro)
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, **metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.train_examples.batch(step, self.config.train.batch_size, process_index, process_count)

    def evaluate(self, state, frozen, key):
        e = self.config.eval
        params = ts.eval_params(state, use_ema=e.use_ema)
        metrics = {"num_params": float(param_count(params))}
        for prefix, examples in (("", self.train_examples), ("heldout/", self.test_examples)):
            n = min(int(e.num_pairs), examples.num_examples)
            nll = tokens = 0.0
            for s in range(0, n, self.config.train.batch_size):
                rows = examples.rows(np.arange(s, min(s + self.config.train.batch_size, n)))
                nll += float(self._nll_sum(params, jnp.asarray(rows["tokens"]), jnp.asarray(rows["loss_mask"])))
                tokens += float(np.sum(rows["loss_mask"][:, 1:]))
            if tokens:
                metrics[prefix + "loss"] = nll / tokens
        source = self.test_examples if self.test_examples.num_examples else self.train_examples
        rows = source.rows(np.arange(min(int(e.num_samples), source.num_examples)))
        self.decode_samples(params, rows["tokens"], rows["loss_mask"], key)
        return metrics

    def plot_title(self, step: int) -> str:
        return f"SFT of {self.hf.path}, step {step}"
