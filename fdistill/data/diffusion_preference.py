"""Known rewards and preference pairs of a diffusion model's own samples, stored as a local TFDS dataset.

Rewards (`build_reward(config.reward, source)`, each a callable x [n, ...] -> r [n] with a
`preferred(x)` set, and a jittable form `value(frozen, x)` whose frozen part (`frozen()`: the mixture,
the classifier's weights) a train step takes as an argument, as the reward-optimisation objectives
FIND and DDPO do):
  * 'half_plane' (GMM): r(x) = scale * (n . x[:2] - offset), n = (cos a, sin a) with a = `angle_deg`;
    the preferred set is the half-plane n . x > offset. The default a = 22.5 deg splits the 8-mode
    ring into 4 preferred and 4 dispreferred modes with no mode on the boundary.
  * 'mode_subset' (GMM): r(x) = scale * sum_{k in modes} w_k(x; smoothing), the posterior probability
    (under the exact mixture noised to `smoothing`) that x belongs to a preferred mode; the preferred
    set is the samples whose nearest mode (in mode-std units) is in `modes`.
  * 'classifier' (digits): r(x) = log p_clf(target_class | x) from the in-project digits classifier
    (`fdistill.evaluation.digits_classifier`); preferred set: argmax_y p_clf(y | x) = target_class.

Pairs (Diffusion-DPO / MaPO setting): 2N samples of the reference model (its deterministic Heun
sampler, the same one used for evaluation), randomly matched into N pairs (a, b) sharing the class
label when the model is conditional, labelled by a Bradley-Terry draw on the known reward:

    P(a preferred to b) = sigmoid((r(a) - r(b)) / temperature),

so `temperature` -> 0 gives deterministic labels and large temperatures give noisy ones. They are
written once with a TensorFlow-free TFDS `GeneratorBasedBuilder` (ArrayRecord files, Tensor features)
into `<reference workdir>/preference_pairs/` (or `config.pairs.dir`), under a builder config named
by a hash of everything that determines them, and read back with `as_data_source()`; every record is
validated on reading (fields, shapes, finiteness, index range) with errors naming record and path.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.configs import ConfigError
from fdistill.data import tfds_build
from fdistill.sharding import process_slice

REWARDS = ("half_plane", "mode_subset", "classifier")
FIELDS = ("index", "x_w", "x_l", "reward_w", "reward_l", "p_label")


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------
class HalfPlaneReward:
    """r(x) = scale * (n . x[:2] - offset) with n = (cos a, sin a); preferred: n . x > offset."""

    def __init__(self, angle_deg: float = 22.5, offset: float = 0.0, scale: float = 1.0):
        a = np.deg2rad(angle_deg)
        self.normal = np.array([np.cos(a), np.sin(a)], np.float32)
        self.offset, self.scale = float(offset), float(scale)

    def _proj(self, x):
        x = np.asarray(x, np.float32)
        return x[:, :2] @ self.normal - self.offset

    def frozen(self):
        return {}

    def value(self, frozen, x: jax.Array) -> jax.Array:
        return self.scale * (x[:, :2] @ jnp.asarray(self.normal) - self.offset)

    def __call__(self, x) -> np.ndarray:
        return (self.scale * self._proj(x)).astype(np.float32)

    def preferred(self, x) -> np.ndarray:
        return self._proj(x) > 0


class ModeSubsetReward:
    """r(x) = scale * P(mode in S | x_smoothing = x) under the exact mixture; preferred: nearest mode in S."""

    def __init__(self, gmm, modes, smoothing: float = 0.1, scale: float = 1.0):
        self.gmm = gmm
        self.modes = np.asarray(sorted(set(int(m) for m in modes)), np.int64)
        k = gmm.num_modes
        if len(self.modes) == 0 or self.modes.min() < 0 or self.modes.max() >= k:
            raise ConfigError(f"config.reward.modes={list(modes)} must be a non-empty subset of 0..{k - 1}")
        self.mask = np.zeros(k, np.float32)
        self.mask[self.modes] = 1.0
        self.smoothing, self.scale = float(smoothing), float(scale)

    def frozen(self):
        return self.gmm

    def value(self, gmm, x: jax.Array) -> jax.Array:
        return self.scale * (gmm.responsibilities(x, self.smoothing) @ jnp.asarray(self.mask))

    def __call__(self, x) -> np.ndarray:
        return np.asarray(self.value(self.gmm, jnp.asarray(x, jnp.float32)), np.float32)

    def preferred(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        means, stds = np.asarray(self.gmm.means), np.asarray(self.gmm.stds)
        d = np.sqrt(((x[:, None, :] - means[None]) ** 2).sum(-1)) / stds[None]
        return self.mask[d.argmin(1)] > 0


class ClassifierReward:
    """r(x) = log p_clf(target | x) of the in-project digits classifier (`source.classifier`,
    `fdistill.evaluation.digits_classifier.DigitsClassifier`); preferred: argmax_y p_clf(y | x) = target."""

    def __init__(self, classifier, target_class: int, floor: float = 1e-12):
        self.clf = classifier
        self.target = int(target_class)
        self.floor = float(floor)

    def _probs(self, x) -> np.ndarray:
        return np.asarray(self.clf.probs(np.asarray(x, np.float32)), np.float64)

    def frozen(self):
        return self.clf.params

    def value(self, clf_params, x: jax.Array) -> jax.Array:
        from fdistill.evaluation.digits_classifier import log_probs

        return jnp.maximum(log_probs(clf_params, x)[:, self.target], np.log(self.floor))

    def __call__(self, x) -> np.ndarray:
        return np.log(np.maximum(self._probs(x)[:, self.target], self.floor)).astype(np.float32)

    def preferred(self, x) -> np.ndarray:
        return self._probs(x).argmax(-1) == self.target


def build_reward(reward_config, source):
    """The reward named by `config.reward.kind` for the reference model's data source."""
    kind = reward_config.kind
    if kind not in REWARDS:
        raise ConfigError(f"config.reward.kind={kind!r} is not known; allowed: {list(REWARDS)}")
    gmm = getattr(source, "gmm", None)
    if kind in ("half_plane", "mode_subset") and gmm is None:
        raise ConfigError(f"config.reward.kind={kind!r} needs a GMM reference model (data.name='gmm')")
    if kind == "half_plane":
        return HalfPlaneReward(reward_config.angle_deg, reward_config.offset, reward_config.scale)
    if kind == "mode_subset":
        return ModeSubsetReward(gmm, reward_config.modes, reward_config.smoothing, reward_config.scale)
    clf = getattr(source, "classifier", None)
    if clf is None:
        raise ConfigError("config.reward.kind='classifier' needs a data source with a classifier (data.name='digits')")
    target = int(reward_config.target_class)
    if not 0 <= target < 10:
        raise ConfigError(f"config.reward.target_class must be in 0..9, got {target}")
    return ClassifierReward(clf, target)


def reward_metrics(reward, x, prefix: str = "", gmm=None) -> dict[str, float]:
    """Mean reward and fraction of samples in the preferred set (non-finite samples count as 0).

    With the GMM, also `preferred_on_data_frac`: the fraction that is preferred AND within 3 mode
    stds of a mode, i.e. preferred samples that are still data-like (reward hacking, pushing
    samples off the modes in the reward's direction, raises reward_mean but not this).
    """
    x = np.asarray(x, np.float32)
    finite = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
    xs = np.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
    r = reward(xs)
    pref = reward.preferred(xs) & finite
    out = {f"{prefix}reward_mean": float(np.mean(r[finite])) if finite.any() else float("nan"),
           f"{prefix}preferred_frac": float(np.mean(pref))}
    if gmm is not None:
        means, stds = np.asarray(gmm.means, np.float64), np.asarray(gmm.stds, np.float64)
        d = np.sqrt(((xs[:, None, :].astype(np.float64) - means[None]) ** 2).sum(-1)) / stds[None]
        out[f"{prefix}preferred_on_data_frac"] = float(np.mean(pref & (d.min(1) <= 3.0)))
    return out


def alignment_metrics(source, reward, x, x_ref) -> dict[str, float]:
    """The metrics of a model aligned to `reward` against its reference (same initial noise): the
    source's sample metrics (`sample/...`), reward_mean, preferred_frac (and preferred_on_data_frac
    on the mixture), the same for the reference (`reference/...`), mmd_to_reference and reward_gain."""
    gmm = getattr(source, "gmm", None)
    metrics = {f"sample/{k}": v for k, v in source.evaluate_samples(x).items()}
    metrics.update({f"reference/{k}": v for k, v in source.evaluate_samples(x_ref).items()})
    metrics.update(reward_metrics(reward, x, "", gmm))
    metrics.update(reward_metrics(reward, x_ref, "reference/", gmm))
    metrics["mmd_to_reference"] = mmd_to_reference(x, x_ref)
    metrics["reward_gain"] = metrics["reward_mean"] - metrics["reference/reward_mean"]
    return metrics


class AlignmentEvaluator:
    """Scores a model aligned to `reward` against its reference, both sampled from the same key
    (`alignment_metrics`). The reference is frozen: its samples are drawn once per (n, key) and kept.
    The latest samples of both are kept for the plots."""

    def __init__(self, source, reward):
        self.source, self.reward = source, reward
        self.samples = self.reference_samples = None
        self._reference_key = None

    def evaluate(self, sample, sample_reference, key, n: int) -> dict[str, float]:
        """`sample(m)` and `sample_reference(m)` draw m samples from `key`; returns the alignment
        metrics and `samples_per_sec` of `sample` (compilation excluded)."""
        from fdistill.evaluation.timing import timed_sampling

        self.samples, per_sec = timed_sampling(sample, n)
        key_bytes = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                               else key).tobytes()
        if self._reference_key != (n, key_bytes):
            self.reference_samples, self._reference_key = sample_reference(n), (n, key_bytes)
        metrics = alignment_metrics(self.source, self.reward, self.samples, self.reference_samples)
        metrics["samples_per_sec"] = per_sec
        return metrics

    def plot(self, plot_dir: str, step: int, title: str, reference_title: str, sample, n: int) -> list[str]:
        """The latest samples (or `sample(min(n, 4096))` before any evaluation) as
        `samples_<step>.png`, and the reference's as `reference_samples.png` once drawn."""
        x = self.samples if self.samples is not None else sample(min(n, 4096))
        paths = [self.source.plot_samples(x, os.path.join(plot_dir, f"samples_{step:07d}.png"), title)]
        if self.reference_samples is not None:
            paths.append(self.source.plot_samples(self.reference_samples,
                                                  os.path.join(plot_dir, "reference_samples.png"), reference_title))
        return paths


def mmd_to_reference(x, x_ref, max_n: int = 4096) -> float:
    """RBF-MMD^2 between model and reference samples (flattened); bandwidths grow with sqrt(dim / 2)
    so the 2-D defaults of `evaluation.samples.mmd_rbf` carry over to images."""
    from fdistill.evaluation.samples import mmd_rbf

    x = np.asarray(x, np.float32).reshape(len(x), -1)
    x_ref = np.asarray(x_ref, np.float32).reshape(len(x_ref), -1)
    scale = float(np.sqrt(max(x.shape[1], 2) / 2.0))
    return mmd_rbf(x, x_ref, bandwidths=tuple(scale * b for b in (0.1, 0.5, 1.0, 2.0, 5.0)), max_n=max_n)


# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------
def bradley_terry_labels(r_a, r_b, temperature: float, rng: np.random.Generator):
    """(a_wins [n] bool, p [n]) with p = P(a > b) = sigmoid((r_a - r_b) / temperature), a_wins ~ Bernoulli(p)."""
    if not temperature > 0:
        raise ConfigError(f"config.pairs.temperature must be > 0, got {temperature}")
    z = (np.asarray(r_a, np.float64) - np.asarray(r_b, np.float64)) / temperature
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # stable sigmoid
    return rng.random(len(p)) < p, p


def make_pairs(x_a, x_b, reward, temperature: float, seed: int, labels=None) -> dict[str, np.ndarray]:
    """Labels N candidate pairs (x_a[i], x_b[i]) by Bradley-Terry on `reward`.

    Returns index, x_w, x_l, reward_w, reward_l, p_label (the BT probability of the drawn label)
    and label (when `labels` is given).
    """
    r_a, r_b = reward(x_a), reward(x_b)
    a_wins, p = bradley_terry_labels(r_a, r_b, temperature, np.random.default_rng([int(seed), 4]))
    sel = a_wins.reshape((-1,) + (1,) * (np.ndim(x_a) - 1))
    out = {
        "index": np.arange(len(p), dtype=np.int64),
        "x_w": np.where(sel, x_a, x_b).astype(np.float32),
        "x_l": np.where(sel, x_b, x_a).astype(np.float32),
        "reward_w": np.where(a_wins, r_a, r_b).astype(np.float32),
        "reward_l": np.where(a_wins, r_b, r_a).astype(np.float32),
        "p_label": np.where(a_wins, p, 1.0 - p).astype(np.float32),
    }
    if labels is not None:
        out["label"] = np.asarray(labels, np.int64)
    return out


def _features(config) -> dict:
    import tensorflow_datasets as tfds

    shape = tuple(config.shape)
    feats = {
        "index": tfds.features.Scalar(np.int64),
        "x_w": tfds.features.Tensor(shape=shape, dtype=np.float32),
        "x_l": tfds.features.Tensor(shape=shape, dtype=np.float32),
        "reward_w": tfds.features.Scalar(np.float32),
        "reward_l": tfds.features.Scalar(np.float32),
        "p_label": tfds.features.Scalar(np.float32),
    }
    if config.conditional:
        feats["label"] = tfds.features.Scalar(np.int64)
    return feats


def _builder_module():
    """(tfds, config class, builder class) of the `diffusion_preference_pairs` dataset."""
    return tfds_build.records_builder("DiffusionPreferencePairs", __file__,
                                      {"shape": (), "conditional": False, "spec": ""}, _features)


def _builder(data_dir: str, name: str, shape, conditional: bool, spec: str = "", pairs=None):
    tfds, PairsConfig, Builder = _builder_module()
    cfg = PairsConfig(name=name, version="1.0.0", description="preference pairs " + spec[:200],
                      shape=tuple(int(s) for s in shape), conditional=bool(conditional), spec=spec)
    with tfds_build.quiet():
        rows = None if pairs is None else [{k: v[i] for k, v in pairs.items()} for i in range(len(pairs["index"]))]
        splits = None if rows is None else {"train": rows}
        return Builder(data_dir=data_dir, config=cfg, file_format="array_record", splits=splits)


def write_pairs(data_dir: str, name: str, pairs: dict, spec: str = "") -> str:
    """Writes `pairs` (from `make_pairs`) as the TFDS dataset `diffusion_preference_pairs/<name>`."""
    tfds = _builder_module()[0]
    b = _builder(data_dir, name, pairs["x_w"].shape[1:], "label" in pairs, spec, pairs)
    with tfds_build.quiet():
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(b.data_dir)


def read_pairs(data_dir: str, name: str, shape, conditional: bool = False, num_pairs: int | None = None) -> dict:
    """Reads and validates every record; returns arrays sorted by `index`.

    Raises FileNotFoundError when the dataset was never written, ValueError naming the record,
    field and path when a record is malformed.
    """
    b = _builder(data_dir, name, shape, conditional)
    with tfds_build.quiet():
        prepared = b.is_prepared()
    if not prepared:
        raise FileNotFoundError(f"no prepared preference-pair dataset {name!r} under {data_dir}")
    where = str(b.data_dir)
    with tfds_build.quiet():
        src = b.as_data_source()["train"]
    n = len(src)
    if num_pairs is not None and n != num_pairs:
        raise ValueError(f"{where}: holds {n} pairs, expected config.pairs.num_pairs={num_pairs}")
    fields = FIELDS + (("label",) if conditional else ())
    out = {k: [] for k in fields}
    shape = tuple(shape)
    for i in range(n):
        rec = tfds_build.read_records(src, [i], b.data_dir)[0]
        missing = [k for k in fields if k not in rec]
        if missing:
            raise ValueError(f"{where}: record {i} lacks field(s) {missing}")
        for k in fields:
            v = np.asarray(rec[k])
            want = shape if k in ("x_w", "x_l") else ()
            if v.shape != want:
                raise ValueError(f"{where}: record {i} field {k!r} has shape {v.shape}, expected {want}")
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                raise ValueError(f"{where}: record {i} field {k!r} is not finite")
            out[k].append(v)
    arrays = {k: np.stack(v) for k, v in out.items()} if n else {k: np.zeros((0,)) for k in fields}
    idx = arrays["index"]
    if n and (idx.min() < 0 or idx.max() >= n or len(np.unique(idx)) != n):
        raise ValueError(f"{where}: record indices are not a permutation of 0..{n - 1}")
    p = arrays["p_label"]
    if n and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"{where}: field 'p_label' outside [0, 1] (record {int(np.argmax((p < 0) | (p > 1)))})")
    order = np.argsort(idx)
    return {k: v[order] for k, v in arrays.items()}


class PairSet:
    """In-memory pairs with deterministic batches: the global batch of `step` is a draw without
    replacement seeded by (seed, step), so any device/process count sees the same data."""

    def __init__(self, arrays: dict, seed: int = 0, path: str = ""):
        self.arrays = arrays
        self.seed = int(seed)
        self.path = path
        self.num_pairs = len(arrays["index"])

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        if global_batch > self.num_pairs:
            raise ConfigError(f"config.train.batch_size={global_batch} exceeds the {self.num_pairs} stored pairs")
        idx = np.random.default_rng([self.seed, 5, int(step)]).choice(self.num_pairs, global_batch, replace=False)
        idx = idx[process_slice(global_batch, process_index, process_count)]
        out = {"x_w": self.arrays["x_w"][idx], "x_l": self.arrays["x_l"][idx]}
        if "label" in self.arrays:
            out["label"] = self.arrays["label"][idx].astype(np.int32)
        return out

    def stats(self) -> dict[str, float]:
        a = self.arrays
        return {"num_pairs": float(self.num_pairs), "reward_gap": float(np.mean(a["reward_w"] - a["reward_l"])),
                "label_agrees_with_reward": float(np.mean(a["reward_w"] >= a["reward_l"]))}


def _spec(config, reference_dir: str, ref_config) -> dict:
    """Everything that determines the pairs (hashed into the dataset's config name)."""
    step = None
    results = os.path.join(reference_dir, "results.json")
    if os.path.exists(results):
        with open(results) as f:
            step = json.load(f).get("step")
    pairs = {k: v for k, v in config.pairs.to_dict().items() if k != "dir"}
    return {"reference": os.path.abspath(reference_dir), "reference_step": step, "reward": config.reward.to_dict(),
            "pairs": pairs, "sampler": [int(config.pairs.num_steps or ref_config.eval.num_steps), config.eval.sampler]}


def ensure_pairs(config, reference_dir: str, ref_config, sample_fn, shape, num_classes: int, reward) -> PairSet:
    """Reads the pairs for this (reference, reward, pairs config), generating and writing them first
    when absent. Generation: 2 * num_pairs reference samples -> random pairs -> Bradley-Terry labels.

    `sample_fn(key, n, labels)` draws n samples of the reference model (labels None or int [n]).
    """
    pc = config.pairs
    n = int(pc.num_pairs)
    if n <= 0:
        raise ConfigError(f"config.pairs.num_pairs must be positive, got {n}")
    spec = json.dumps(_spec(config, reference_dir, ref_config), sort_keys=True, default=str)
    name = "p" + hashlib.sha256(spec.encode()).hexdigest()[:12]
    data_dir = pc.dir or os.path.join(reference_dir, "preference_pairs")
    conditional = num_classes > 0
    try:
        arrays = read_pairs(data_dir, name, shape, conditional, n)
    except FileNotFoundError:
        arrays = None
    if arrays is None:
        if jax.process_index() == 0:
            seed = int(pc.seed)
            labels = np.random.default_rng([seed, 6]).integers(0, num_classes, n) if conditional else None
            key = jax.random.PRNGKey(seed)
            x_a = sample_fn(jax.random.fold_in(key, 0), n, labels)
            x_b = sample_fn(jax.random.fold_in(key, 1), n, labels)
            pairs = make_pairs(x_a, x_b, reward, float(pc.temperature), seed, labels)
            path = write_pairs(data_dir, name, pairs, spec)
            with open(os.path.join(path, "spec.json"), "w") as f:
                f.write(spec)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fdistill_preference_pairs_written")
        arrays = read_pairs(data_dir, name, shape, conditional, n)
    return PairSet(arrays, int(pc.seed), os.path.join(data_dir, name))
