"""The in-project feature network for digits: a small CNN classifier whose penultimate activations
play the role Inception-v3 pool features play in FID (arXiv 1706.08500), for `fd_digits`, k-NN
precision/recall and `class_entropy` of generated digits.

Trained once per (resolution, seed) on the train split (1500 images) with Adam and random
+-1-pixel (x resolution / 8) shifts, then cached as `<data_dir>/fdistill_classifier/digits_<R>px_s<seed>.msgpack`
with a JSON sidecar holding its test accuracy (297 held-out images), so evaluations and tables never
retrain it. Inputs are images in [-1, 1], [n, R, R, 1].
"""
from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

VERSION = 1
FEATURE_DIM = 64
NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """[2x2 average pooling down to 8x8 for larger inputs] - conv3x3(32) - conv3x3/2(64) -
    conv3x3(64) - dense(64) [features] - dense(10)."""

    feature_dim: int = FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array):
        if x.shape[1] > 8:  # upsampled digits carry no detail beyond 8x8; pooling keeps training fast
            f = x.shape[1] // 8
            x = nn.avg_pool(x, (f, f), strides=(f, f))
        h = nn.silu(nn.Conv(32, (3, 3))(x))
        h = nn.silu(nn.Conv(64, (3, 3), strides=(2, 2))(h))
        h = nn.silu(nn.Conv(64, (3, 3))(h))
        h = h.reshape(h.shape[0], -1)
        feats = nn.silu(nn.Dense(self.feature_dim)(h))
        return feats, nn.Dense(NUM_CLASSES)(feats)


def _shift(key, x: jax.Array, max_shift: int) -> jax.Array:
    """Random integer translations by up to `max_shift` pixels, padding with background (-1)."""
    n, h, w, _ = x.shape
    pad = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
    offs = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(pad, offs)


def train_classifier(train, test, seed: int = 0, steps: int = 800, batch_size: int = 128,
                     learning_rate: float = 2e-3) -> tuple[dict, dict]:
    """Trains `DigitsCNN` on (images, labels) `train`; returns (params, info with test_accuracy)."""
    x_tr, y_tr = (np.asarray(a) for a in train)
    x_te, y_te = (np.asarray(a) for a in test)
    model = DigitsCNN()
    key = jax.random.key(seed)
    params = model.init(key, jnp.zeros((1,) + x_tr.shape[1:]))["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)
    opt = tx.init(params)
    max_shift = max(1, x_tr.shape[1] // 8)

    @jax.jit
    def step(params, opt, x, y, key):
        x = _shift(key, x, max_shift)

        def loss_fn(p):
            _, logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    perm, pos = rng.permutation(len(x_tr)), 0
    for i in range(steps):
        if pos + batch_size > len(perm):
            perm, pos = rng.permutation(len(x_tr)), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        params, opt, loss = step(params, opt, x_tr[idx], y_tr[idx], jax.random.fold_in(key, i))
    loss = float(loss)
    clf = DigitsClassifier(params, {})
    info = {
        "version": VERSION,
        "seed": seed,
        "steps": steps,
        "resolution": int(x_tr.shape[1]),
        "final_train_loss": loss,
        "train_accuracy": clf.accuracy(x_tr, y_tr),
        "test_accuracy": clf.accuracy(x_te, y_te),
        "num_train": int(len(x_tr)),
        "num_test": int(len(x_te)),
        "train_seconds": time.perf_counter() - t0,
    }
    return params, info


_APPLY = jax.jit(lambda params, x: DigitsCNN().apply({"params": params}, x))


def log_probs(params, x: jax.Array) -> jax.Array:
    """log p_clf(y | x) [n, 10], jittable (the classifier's weights are an argument)."""
    return jax.nn.log_softmax(DigitsCNN().apply({"params": params}, x)[1])


class DigitsClassifier:
    """Features, class probabilities and accuracy of a trained `DigitsCNN` (`info` = training record)."""

    def __init__(self, params, info: dict, chunk: int = 1024):
        self.params = params
        self.info = info
        self.chunk = chunk

    @property
    def test_accuracy(self) -> float:
        return float(self.info["test_accuracy"])

    def features_and_probs(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(penultimate features [n, 64], softmax probabilities [n, 10]) in float32 NumPy."""
        x = np.asarray(x, np.float32)
        feats, probs = [], []
        for s in range(0, len(x), self.chunk):
            part = x[s:s + self.chunk]
            pad = np.resize(part, (self.chunk,) + part.shape[1:])  # one compiled shape
            f, logits = _APPLY(self.params, jnp.asarray(pad))
            feats.append(np.asarray(f)[:len(part)])
            probs.append(np.asarray(jax.nn.softmax(logits))[:len(part)])
        return np.concatenate(feats), np.concatenate(probs)

    def features(self, x) -> np.ndarray:
        return self.features_and_probs(x)[0]

    def probs(self, x) -> np.ndarray:
        return self.features_and_probs(x)[1]

    def accuracy(self, x, y) -> float:
        return float(np.mean(self.probs(x).argmax(1) == np.asarray(y)))


def cache_path(data_dir: str, resolution: int, seed: int = 0) -> str:
    return os.path.join(data_dir, "fdistill_classifier", f"digits_{resolution}px_s{seed}_v{VERSION}.msgpack")


def load_or_train(data_dir: str, resolution: int, train, test, seed: int = 0, verbose: bool = True) -> DigitsClassifier:
    """The cached classifier for `resolution`, training and caching it first if needed."""
    path = cache_path(data_dir, resolution, seed)
    meta = path[: -len(".msgpack")] + ".json"
    template = DigitsCNN().init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 1)))["params"]
    if os.path.exists(path) and os.path.exists(meta):
        with open(path, "rb") as f:
            params = flax.serialization.from_bytes(template, f.read())
        with open(meta) as f:
            return DigitsClassifier(params, json.load(f))
    params, info = train_classifier(train, test, seed)
    if verbose:
        print(f"[fdistill] trained the digits classifier ({resolution}px) in {info['train_seconds']:.1f}s: "
              f"test accuracy {info['test_accuracy']:.4f}; cached in {path}", flush=True)
    save(path, params, info)
    return DigitsClassifier(params, info)


def save(path: str, params, info: dict) -> None:
    """Writes params (msgpack) and `info` (JSON sidecar) atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = path[: -len(".msgpack")] + ".json"
    for target, payload, mode in ((path, flax.serialization.to_bytes(params), "wb"),
                                  (meta, json.dumps(info, indent=2), "w")):
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, mode) as f:
            f.write(payload)
        os.replace(tmp, target)
