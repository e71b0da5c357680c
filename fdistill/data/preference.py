"""A synthetic language with a known reward, its SFT data, and preference pairs stored with TFDS.

The language (`SyntheticLanguage(config.task)`):
  * tokens: PAD=0, BOS=1, SEP=2, EOS=3 and `vocab_size - 4` content words 4..vocab_size-1.
  * a prompt is [BOS, a, b, SEP] with two content words a != b; a fixed random derangement pi of the
    content words (seeded by `task.seed`) defines the prompt's three *target words*
        T(x) = {a, b, pi(a)}      (prompts with b = pi(a) are excluded, so |T(x)| = 3).
    A seeded `heldout_frac` of the prompts is held out for evaluation and never trained on.
  * a response is 1 .. response_len - 1 content words followed by EOS (it fits in `response_len`
    positions); a sequence is prompt + response, right-padded to prompt_len + response_len tokens.
  * the hidden true reward rewards content and penalises length:
        r(x, y) = #{t in T(x) : t occurs in y} - length_cost * |y|,     |y| = number of words,
    so the best response is the three targets and nothing else (3 - 3 * length_cost) and repeating
    words or padding an answer with filler only costs.
  * the SFT demonstrator writes |y| ~ Uniform{1 .. demo_max_words} words, each a uniformly drawn
    target word with probability `demo_target_prob` and a uniform non-target word otherwise: a
    mediocre, length-diverse policy (longer answers cover more targets but pay for every word).

Preference pairs (`make_pairs`): two responses of the SFT policy per prompt, labelled by a
Bradley-Terry draw on the true reward, P(a > b) = sigmoid((r(a) - r(b)) / bt_temperature).
`write_pairs` stores them with a TensorFlow-free TFDS `GeneratorBasedBuilder` (ArrayRecord files,
Tensor/Scalar features, splits 'train' = training prompts and 'test' = held-out prompts);
`read_pairs` validates every record (fields present, prompt well formed, responses non-empty,
within the context and made of content words, indices a permutation) and raises a ValueError
naming the record, field, split and path.
"""
from __future__ import annotations


import numpy as np

from fdistill.configs import ConfigError
from fdistill.data import tfds_build
from fdistill.sharding import process_slice

PAD, BOS, SEP, EOS = 0, 1, 2, 3
NUM_SPECIAL = 4
PROMPT_LEN = 4
NUM_TARGETS = 3
FIELDS = ("index", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "p_chosen")
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------------------------
# The language and its reward
# ----------------------------------------------------------------------------------------------
class SyntheticLanguage:
    """The known-reward task of the module docstring, built from `config.task`."""

    def __init__(self, task_config):
        c = task_config
        self.vocab_size = int(c.vocab_size)
        self.response_len = int(c.response_len)
        self.length_cost = float(c.length_cost)
        self.seed = int(c.seed)
        self.demo_target_prob = float(c.demo_target_prob)
        self.demo_max_words = int(c.demo_max_words) or self.response_len - 1  # 0: as long as fits
        self.num_content = self.vocab_size - NUM_SPECIAL
        if self.num_content < 4:
            raise ConfigError(f"config.task.vocab_size={self.vocab_size} leaves {self.num_content} content words; "
                             f"need >= 4 (vocab_size >= {NUM_SPECIAL + 4})")
        if self.response_len < 2:
            raise ConfigError(f"config.task.response_len={self.response_len} must be >= 2 (a word and EOS)")
        if not 1 <= self.demo_max_words <= self.response_len - 1:
            raise ConfigError(f"config.task.demo_max_words={self.demo_max_words} must be in "
                             f"[1, response_len - 1 = {self.response_len - 1}]")
        if not 0.0 <= self.demo_target_prob <= 1.0:
            raise ConfigError(f"config.task.demo_target_prob={self.demo_target_prob} must be in [0, 1]")
        if self.length_cost < 0:
            raise ConfigError(f"config.task.length_cost={self.length_cost} must be >= 0")
        heldout = float(c.heldout_frac)
        if not 0.0 < heldout < 1.0:
            raise ConfigError(f"config.task.heldout_frac={heldout} must be in (0, 1)")
        self.seq_len = PROMPT_LEN + self.response_len

        rng = np.random.default_rng([self.seed, 1])
        words = np.arange(NUM_SPECIAL, self.vocab_size)
        while True:  # a derangement: pi(a) != a
            perm = rng.permutation(self.num_content)
            if not np.any(perm == np.arange(self.num_content)):
                break
        self.pi = np.zeros(self.vocab_size, np.int32)
        self.pi[words] = words[perm]
        a, b = np.meshgrid(words, words, indexing="ij")
        a, b = a.ravel(), b.ravel()
        keep = (a != b) & (b != self.pi[a])
        prompts = np.stack([np.full(keep.sum(), BOS), a[keep], b[keep], np.full(keep.sum(), SEP)], 1).astype(np.int32)
        order = rng.permutation(len(prompts))
        n_held = max(1, int(round(heldout * len(prompts))))
        self.heldout_prompts = prompts[np.sort(order[:n_held])]
        self.train_prompts = prompts[np.sort(order[n_held:])]

    # ----- structure --------------------------------------------------------------------------
    def targets(self, prompts: np.ndarray) -> np.ndarray:
        """The target words T(x) of each prompt, [N, 3]."""
        prompts = np.asarray(prompts)
        return np.stack([prompts[:, 1], prompts[:, 2], self.pi[prompts[:, 1]]], 1)

    def reward(self, prompts: np.ndarray, words: np.ndarray, num_words: np.ndarray) -> np.ndarray:
        """r(x, y) = #{t in T(x) present in y} - length_cost * |y| ([N] float32).

        `words` [N, W] holds each response's words left-aligned (entries at or beyond `num_words`
        are ignored)."""
        words, num_words = np.asarray(words), np.asarray(num_words)
        valid = np.arange(words.shape[1])[None] < num_words[:, None]
        tg = self.targets(prompts)
        hits = ((words[:, None, :] == tg[:, :, None]) & valid[:, None, :]).any(-1).sum(-1)
        return (hits - self.length_cost * num_words).astype(np.float32)

    def sequence_reward(self, tokens):
        """`reward` of whole sequences [N, seq_len] in JAX (jit-compatible; [N] float32): the words
        are the response tokens before the first EOS (on-policy training and decoding use it)."""
        import jax.numpy as jnp

        resp, num_words, valid = response_words(tokens)
        a = tokens[:, 1]
        tg = jnp.stack([a, tokens[:, 2], jnp.asarray(self.pi)[a]], axis=1)
        hits = ((resp[:, None, :] == tg[:, :, None]) & valid[:, None, :]).any(-1).sum(-1)
        return hits.astype(jnp.float32) - self.length_cost * num_words.astype(jnp.float32)

    def best_reward(self) -> float:
        return NUM_TARGETS - NUM_TARGETS * self.length_cost

    def grammar_bias(self) -> np.ndarray:
        """[seq_len, vocab] additive next-token bias (0 allowed, -1e9 forbidden): row t constrains the
        token at position t + 1. Responses are content words then EOS: the first response token must
        be a word, the last slot must be EOS, PAD/BOS/SEP never appear in a response."""
        bias = np.zeros((self.seq_len, self.vocab_size), np.float32)
        for pos in range(PROMPT_LEN, self.seq_len):
            j = pos - PROMPT_LEN
            allowed = np.zeros(self.vocab_size, bool)
            if j < self.response_len - 1:
                allowed[NUM_SPECIAL:] = True
            if j >= 1:
                allowed[EOS] = True
            bias[pos - 1] = np.where(allowed, 0.0, -1e9)
        return bias

    # ----- sequences ---------------------------------------------------------------------------
    def sequences(self, prompts: np.ndarray, words: np.ndarray, num_words: np.ndarray):
        """(tokens [N, seq_len] int32, loss_mask [N, seq_len] float32, lengths [N] float32).

        tokens = prompt + words + EOS + PAD...; the mask covers the words and the EOS; lengths count
        the masked tokens (words + 1)."""
        n = len(prompts)
        num_words = np.asarray(num_words, np.int64)
        tokens = np.full((n, self.seq_len), PAD, np.int32)
        tokens[:, :PROMPT_LEN] = prompts
        slot = np.arange(self.response_len)[None]
        resp = np.where(slot < num_words[:, None], _pad_to(words, self.response_len), PAD)
        resp = np.where(slot == num_words[:, None], EOS, resp)
        tokens[:, PROMPT_LEN:] = resp
        mask = np.zeros((n, self.seq_len), np.float32)
        mask[:, PROMPT_LEN:] = slot <= num_words[:, None]
        return tokens, mask, (num_words + 1).astype(np.float32)

    def split_responses(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(words [N, response_len] (PAD after the words), num_words [N]) of generated sequences."""
        resp = np.asarray(tokens)[:, PROMPT_LEN:]
        is_eos = resp == EOS
        num_words = np.where(is_eos.any(1), is_eos.argmax(1), resp.shape[1])
        words = np.where(np.arange(resp.shape[1])[None] < num_words[:, None], resp, PAD)
        return words.astype(np.int32), num_words.astype(np.int64)

    # ----- the demonstrator --------------------------------------------------------------------
    def demonstrations(self, rng: np.random.Generator, prompts: np.ndarray):
        """(words [N, response_len], num_words [N]) drawn from the SFT demonstrator."""
        n = len(prompts)
        num_words = rng.integers(1, self.demo_max_words + 1, n)
        tg = self.targets(prompts)
        use_target = rng.random((n, self.response_len)) < self.demo_target_prob
        target = np.take_along_axis(tg, rng.integers(0, NUM_TARGETS, (n, self.response_len)), 1)
        # a uniform non-target word: draw among num_content - 3 slots, then skip over the targets
        other = rng.integers(0, self.num_content - NUM_TARGETS, (n, self.response_len)) + NUM_SPECIAL
        for t in np.sort(tg, axis=1).T:
            other = other + (other >= t[:, None])
        words = np.where(use_target, target, other)
        words = np.where(np.arange(self.response_len)[None] < num_words[:, None], words, PAD)
        return words.astype(np.int32), num_words

    def sft_batch(self, step: int, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's slice of the SFT batch of `step` (a function of (seed, step) only)."""
        rng = np.random.default_rng([int(seed), 2, int(step)])
        prompts = self.train_prompts[rng.integers(0, len(self.train_prompts), global_batch)]
        words, n = self.demonstrations(rng, prompts)
        tokens, mask, _ = self.sequences(prompts, words, n)
        sl = process_slice(global_batch, process_index, process_count)
        return {"tokens": tokens[sl], "loss_mask": mask[sl]}

    def heldout_demonstrations(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        """n demonstrator sequences on held-out prompts (for the held-out NLL)."""
        rng = np.random.default_rng([int(seed), 3])
        prompts = self.heldout_prompts[rng.integers(0, len(self.heldout_prompts), n)]
        words, num = self.demonstrations(rng, prompts)
        tokens, mask, _ = self.sequences(prompts, words, num)
        return {"tokens": tokens, "loss_mask": mask, "reward": self.reward(prompts, words, num),
                "num_words": num}


def response_words(tokens):
    """(response tokens [N, response_len], num_words [N], valid [N, response_len] bool) of whole
    sequences in JAX (jit-compatible): the words are the response tokens before the first EOS, all of
    them when there is none (the JAX counterpart of `SyntheticLanguage.split_responses`)."""
    import jax.numpy as jnp

    resp = tokens[:, PROMPT_LEN:]
    is_eos = resp == EOS
    num_words = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1), resp.shape[1])
    return resp, num_words, jnp.arange(resp.shape[1])[None] < num_words[:, None]


def _pad_to(words: np.ndarray, width: int) -> np.ndarray:
    words = np.asarray(words)
    if words.shape[1] >= width:
        return words[:, :width]
    return np.pad(words, ((0, 0), (0, width - words.shape[1])), constant_values=PAD)


# ----------------------------------------------------------------------------------------------
# Pairs: sampling and Bradley-Terry labels
# ----------------------------------------------------------------------------------------------
def bradley_terry(r_a: np.ndarray, r_b: np.ndarray, temperature: float, rng: np.random.Generator):
    """(a_wins [N] bool, p [N]): p = P(a > b) = sigmoid((r_a - r_b) / temperature), a_wins ~ Bernoulli(p)."""
    if not temperature > 0:
        raise ConfigError(f"config.po.pairs.bt_temperature must be > 0, got {temperature}")
    z = (np.asarray(r_a, np.float64) - np.asarray(r_b, np.float64)) / temperature
    p = 0.5 * (1.0 + np.tanh(0.5 * z))
    return rng.random(len(p)) < p, p


def make_pairs(task: SyntheticLanguage, prompts: np.ndarray, tokens_a: np.ndarray, tokens_b: np.ndarray,
               bt_temperature: float, seed: int) -> dict[str, np.ndarray]:
    """Labels two sampled responses per prompt (sequences [N, seq_len]) by Bradley-Terry on the true
    reward. Returns index, prompt, chosen/rejected words (+ num words), rewards and p_chosen."""
    wa, na = task.split_responses(tokens_a)
    wb, nb = task.split_responses(tokens_b)
    ra, rb = task.reward(prompts, wa, na), task.reward(prompts, wb, nb)
    a_wins, p = bradley_terry(ra, rb, bt_temperature, np.random.default_rng([int(seed), 4]))
    sel = a_wins[:, None]
    return {
        "index": np.arange(len(prompts), dtype=np.int64),
        "prompt": np.asarray(prompts, np.int32),
        "chosen": np.where(sel, wa, wb), "chosen_words": np.where(a_wins, na, nb),
        "rejected": np.where(sel, wb, wa), "rejected_words": np.where(a_wins, nb, na),
        "reward_chosen": np.where(a_wins, ra, rb).astype(np.float32),
        "reward_rejected": np.where(a_wins, rb, ra).astype(np.float32),
        "p_chosen": np.where(a_wins, p, 1.0 - p).astype(np.float32),
    }


def relabel_pairs(arrays: dict[str, np.ndarray], proxy_chosen: np.ndarray, proxy_rejected: np.ndarray,
                  temperature: float, seed: int) -> dict[str, np.ndarray]:
    """The same pairs labelled by a Bradley-Terry draw on *proxy* rewards (a learned reward model)
    instead of the true reward: where the draw prefers the current 'rejected' response the two swap
    (their true rewards travel with them, so `label_agrees_with_reward` measures the proxy's label
    noise); `p_chosen` becomes the proxy's probability of the new label."""
    swap_wins, p = bradley_terry(proxy_rejected, proxy_chosen, temperature, np.random.default_rng([int(seed), 11]))
    out = dict(arrays)
    for a, b in (("chosen", "rejected"), ("chosen_words", "rejected_words"), ("reward_chosen", "reward_rejected")):
        sel = swap_wins.reshape((-1,) + (1,) * (arrays[a].ndim - 1))
        out[a], out[b] = np.where(sel, arrays[b], arrays[a]), np.where(sel, arrays[a], arrays[b])
    out["p_chosen"] = np.where(swap_wins, p, 1.0 - p).astype(np.float32)
    return out


def to_records(pairs: dict) -> list[dict]:
    """One TFDS record per pair; responses are stored as their words only (no EOS, no padding)."""
    out = []
    for i in range(len(pairs["index"])):
        out.append({
            "index": int(pairs["index"][i]),
            "prompt": np.asarray(pairs["prompt"][i], np.int32),
            "chosen": np.asarray(pairs["chosen"][i][: int(pairs["chosen_words"][i])], np.int32),
            "rejected": np.asarray(pairs["rejected"][i][: int(pairs["rejected_words"][i])], np.int32),
            "reward_chosen": np.float32(pairs["reward_chosen"][i]),
            "reward_rejected": np.float32(pairs["reward_rejected"][i]),
            "p_chosen": np.float32(pairs["p_chosen"][i]),
        })
    return out


# ----------------------------------------------------------------------------------------------
# TFDS storage (ArrayRecord, no TensorFlow)
# ----------------------------------------------------------------------------------------------
def _features(config) -> dict:
    import tensorflow_datasets as tfds

    return {
        "index": tfds.features.Scalar(np.int64),
        "prompt": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "chosen": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "rejected": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "reward_chosen": tfds.features.Scalar(np.float32),
        "reward_rejected": tfds.features.Scalar(np.float32),
        "p_chosen": tfds.features.Scalar(np.float32),
    }


def _builder_classes():
    """(tfds, config class, builder class) of the `synthetic_preference_pairs` dataset."""
    return tfds_build.records_builder("SyntheticPreferencePairs", __file__, {"spec": ""}, _features)


def _builder(data_dir: str, name: str, spec: str = "", records: dict | None = None):
    tfds, PairsConfig, Builder = _builder_classes()
    cfg = PairsConfig(name=name, version="1.0.0", description="preference pairs " + spec[:300], spec=spec)
    return Builder(data_dir=data_dir, config=cfg, file_format="array_record", splits=records)


def write_pairs(data_dir: str, name: str, records: dict[str, list[dict]], spec: str = "") -> str:
    """Writes {split: records} as TFDS dataset `synthetic_preference_pairs/<name>` under `data_dir`;
    returns the dataset's directory. Records are written as given (no validation)."""
    tfds = _builder_classes()[0]
    b = _builder(data_dir, name, spec, records)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(b.data_dir)


def is_prepared(data_dir: str, name: str) -> bool:
    return _builder(data_dir, name).is_prepared()


def validate_record(rec: dict, position: int, where: str, task: SyntheticLanguage) -> None:
    """Raises ValueError naming the record and field when `rec` is malformed."""
    what = f"{where}: record {position}"
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        raise ValueError(f"{what} lacks field(s) {missing}; every record needs {list(FIELDS)}")
    what = f"{where}: record {position} (index {int(np.asarray(rec['index']))})"
    prompt = np.asarray(rec["prompt"])
    if (prompt.shape != (PROMPT_LEN,) or prompt[0] != BOS or prompt[-1] != SEP
            or np.any(prompt[1:-1] < NUM_SPECIAL) or np.any(prompt[1:-1] >= task.vocab_size)):
        raise ValueError(f"{what}: field 'prompt' = {prompt.tolist()} is not [BOS, word, word, SEP] "
                         f"with words in [{NUM_SPECIAL}, {task.vocab_size})")
    for field in ("chosen", "rejected"):
        y = np.asarray(rec[field])
        if y.ndim != 1:
            raise ValueError(f"{what}: field {field!r} has shape {y.shape}, expected a 1-D token list")
        if len(y) == 0:
            raise ValueError(f"{what}: field {field!r} is an empty response (a response needs >= 1 word)")
        if len(y) + 1 > task.response_len:
            raise ValueError(f"{what}: field {field!r} has {len(y)} words; with EOS it needs {len(y) + 1} "
                             f"positions, over the response context config.task.response_len={task.response_len}")
        if np.any(y < NUM_SPECIAL) or np.any(y >= task.vocab_size):
            raise ValueError(f"{what}: field {field!r} holds tokens outside the content words "
                             f"[{NUM_SPECIAL}, {task.vocab_size}): {y.tolist()}")
    for field in ("reward_chosen", "reward_rejected", "p_chosen"):
        v = float(np.asarray(rec[field]))
        if not np.isfinite(v):
            raise ValueError(f"{what}: field {field!r} is not finite ({v})")
    p = float(np.asarray(rec["p_chosen"]))
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what}: field 'p_chosen' = {p} is outside [0, 1]")


def records_to_arrays(records: list[dict], task: SyntheticLanguage, where: str) -> dict[str, np.ndarray]:
    """Validates records and stacks them into arrays sorted by index (index must be 0..N-1)."""
    for i, rec in enumerate(records):
        validate_record(rec, i, where, task)
    n = len(records)
    idx = np.array([int(np.asarray(r["index"])) for r in records], np.int64)
    if n and not np.array_equal(np.sort(idx), np.arange(n)):
        dup = [int(v) for v in np.unique(idx) if np.sum(idx == v) > 1][:5]
        raise ValueError(f"{where}: record indices are not a permutation of 0..{n - 1} "
                         f"(min {idx.min()}, max {idx.max()}, duplicated {dup})")
    order = np.argsort(idx)
    recs = [records[i] for i in order]
    out = {"index": idx[order], "prompt": np.stack([np.asarray(r["prompt"], np.int32) for r in recs])
           if n else np.zeros((0, PROMPT_LEN), np.int32)}
    for field in ("chosen", "rejected"):
        out[f"{field}_words"] = np.array([len(r[field]) for r in recs], np.int64)
        out[field] = _pad_to(np.zeros((n, 0), np.int32), task.response_len)
        for i, r in enumerate(recs):
            out[field][i, : len(r[field])] = np.asarray(r[field])
    for field in ("reward_chosen", "reward_rejected", "p_chosen"):
        out[field] = np.array([float(np.asarray(r[field])) for r in recs], np.float32)
    return out


def read_pairs(data_dir: str, name: str, task: SyntheticLanguage) -> dict[str, dict[str, np.ndarray]]:
    """{split: arrays} of a written dataset, every record validated (ValueError naming record, field,
    split and path); FileNotFoundError when it was never written."""
    b = _builder(data_dir, name)
    if not b.is_prepared():
        raise FileNotFoundError(f"no prepared preference dataset {name!r} under {data_dir}")
    sources = b.as_data_source()
    out = {}
    for split in SPLITS:
        if split not in sources:
            raise ValueError(f"{b.data_dir}: split {split!r} is missing (have {sorted(sources)})")
        src = sources[split]
        records = tfds_build.read_records(src, range(len(src)), b.data_dir)
        out[split] = records_to_arrays(records, task, f"{b.data_dir} split {split!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def epoch_indices(num: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Dataset rows of the global batch of `step`: the data are visited epoch by epoch, each epoch in
    its own permutation seeded by (seed, epoch), so a batch depends on (seed, step) only."""
    pos = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
    epochs = pos // num
    out = np.empty(global_batch, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = np.random.default_rng([int(seed), 7, int(e)]).permutation(num)[pos[sel] % num]
    return out


class PreferencePairs:
    """Pairs as model inputs: chosen/rejected sequences, loss masks and lengths (plus the reference
    log-probabilities once `set_reference_logps` is called). `batch(step, ...)` is deterministic."""

    def __init__(self, arrays: dict[str, np.ndarray], task: SyntheticLanguage, seed: int = 0, path: str = ""):
        self.arrays, self.task, self.seed, self.path = arrays, task, int(seed), path
        self.num_pairs = len(arrays["index"])
        p = arrays["prompt"]
        self.inputs = {}
        for field in ("chosen", "rejected"):
            tokens, mask, lengths = task.sequences(p, arrays[field], arrays[f"{field}_words"])
            self.inputs.update({f"{field}_tokens": tokens, f"{field}_mask": mask, f"{field}_lengths": lengths})

    def set_reference_logps(self, chosen: np.ndarray, rejected: np.ndarray) -> None:
        self.inputs["ref_chosen_logps"] = np.asarray(chosen, np.float32)
        self.inputs["ref_rejected_logps"] = np.asarray(rejected, np.float32)

    def rows(self, idx) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.inputs.items()}

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        if self.num_pairs == 0:
            raise ValueError(f"{self.path}: no preference pairs to train on")
        idx = epoch_indices(self.num_pairs, global_batch, step, self.seed)
        return self.rows(idx[process_slice(global_batch, process_index, process_count)])

    def stats(self) -> dict[str, float]:
        a = self.arrays
        return {
            "num_pairs": float(self.num_pairs),
            "reward_gap": float(np.mean(a["reward_chosen"] - a["reward_rejected"])),
            "label_agrees_with_reward": float(np.mean(a["reward_chosen"] > a["reward_rejected"])),
            "chosen_longer": float(np.mean(a["chosen_words"] > a["rejected_words"])),
            "mean_words_chosen": float(np.mean(a["chosen_words"])),
            "mean_words_rejected": float(np.mean(a["rejected_words"])),
        }


class UnpairedExamples:
    """The pairs of a `PreferencePairs` as unpaired examples for KTO (arXiv 2402.01306): every chosen
    response is a desirable example (label 1) and every rejected one an undesirable example (label
    0), the same Bradley-Terry labels, 2N examples visited in their own epoch permutations, so a
    batch rarely holds both halves of a pair.

    A batch has `tokens`, `mask`, `lengths`, `desirable` [B] and the KL completions of KTO's
    reference point: example i's prompt with the response of the next example of the *global*
    batch, (i + 1) mod B (`kl_tokens`, `kl_mask`), the mismatched pairs (x_i, y_{i+1}) whose
    policy/reference log-ratio estimates KL(pi || pi_ref) (TRL's KTOTrainer shifts the same way)."""

    def __init__(self, pairs: PreferencePairs):
        x = pairs.inputs
        self.path, self.seed, self.num_pairs = pairs.path, pairs.seed, pairs.num_pairs
        self.num_examples = 2 * self.num_pairs
        self.inputs = {k: np.concatenate([x[f"chosen_{k}"], x[f"rejected_{k}"]]) for k in ("tokens", "mask", "lengths")}
        self.inputs["desirable"] = np.repeat(np.array([1.0, 0.0], np.float32), self.num_pairs)

    def rows(self, idx) -> dict[str, np.ndarray]:
        out = {k: v[idx] for k, v in self.inputs.items()}
        nxt = np.roll(np.asarray(idx), -1)
        out["kl_tokens"] = self.inputs["tokens"][nxt].copy()
        out["kl_tokens"][:, :PROMPT_LEN] = out["tokens"][:, :PROMPT_LEN]
        out["kl_mask"] = self.inputs["mask"][nxt]
        return out

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        if self.num_examples == 0:
            raise ValueError(f"{self.path}: no preference examples to train on")
        rows = self.rows(epoch_indices(self.num_examples, global_batch, step, self.seed))
        sl = process_slice(global_batch, process_index, process_count)
        return {k: v[sl] for k, v in rows.items()}
