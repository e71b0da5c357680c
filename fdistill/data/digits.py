"""scikit-learn's handwritten digits as a local TFDS dataset and a diffusion `DataSource`.

The dataset (1797 grey 8x8 images, values 0..16, 10 classes; UCI optical digits, bundled inside
the scikit-learn wheel, so nothing is downloaded) is written by the TFDS builder `fdistill_digits`
in ArrayRecord format into a local data_dir (`config.data.data_dir`, else $FDISTILL_DATA_DIR, else
~/.cache/fdistill/tfds) on first use, and read back with `builder.as_data_source()` (no TensorFlow).

Records: {'image': float32 [8, 8, 1] in [-1, 1] (= value / 8 - 1), 'label': int64 in 0..9,
'index': int64 position in `load_digits()`}. Splits: a fixed permutation (seed 0) of the 1797
images puts 297 in 'test' and 1500 in 'train'. Records come back in key-hash order, so the reader
sorts them by 'index'.

The source (`make_source`, `config.data.name = 'digits'`) yields training images at
`config.data.resolution` 8 (native) or 16 (bilinear 2x upsampling), shape (R, R, 1) in [-1, 1], with
labels; batches follow `fdistill.data.images.EpochShuffler` (deterministic in (seed, step); the
pipeline's position is the step saved in every checkpoint). `evaluate_samples` scores samples in the
features of the in-project digits classifier (`fdistill.evaluation.digits_classifier`, trained once
on the train split and cached in the data_dir): `fd_digits` (Frechet distance to the train split),
`fd_digits_inf` (the same extrapolated to infinitely many samples, FID-infinity; from 1280 samples on: compare
models on this one, on equal sample counts),
k-NN `precision`/`recall` (k = 3), `class_entropy` (nats; log 10 = 2.303 for uniform classes),
`class_tv` (total variation between the classifier's class histogram of the samples and the train
split's class frequencies: the digits' mode-weight TV) and,
for class-conditional samples, `label_accuracy`.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from fdistill.configs import ConfigError
from fdistill.data import images as image_lib
from fdistill.data import tfds_build
from fdistill.evaluation import feature_metrics

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 1500, 297, 10
RESOLUTIONS = (8, 16)
BUILDER_NAME = "fdistill_digits"


def _split_indices() -> dict[str, np.ndarray]:
    perm = np.random.default_rng(0).permutation(NUM_TRAIN + NUM_TEST)
    return {"test": np.sort(perm[:NUM_TEST]), "train": np.sort(perm[NUM_TEST:])}


class FdistillDigits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for sklearn.datasets.load_digits (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")

    # No checksums file next to the code (nothing is downloaded). Overriding this also avoids TFDS's
    # code-path lookup, which needs the optional `importlib_resources` package.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    RELEASE_NOTES = {"1.0.0": "8x8 digits from scikit-learn, fixed 1500/297 train/test split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn's bundled 8x8 handwritten digits, scaled to [-1, 1].",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(idx) for split, idx in _split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        d = load_digits()
        for i in indices:
            image = (d.images[i].astype(np.float32) / 8.0 - 1.0)[:, :, None]
            yield int(i), {"image": image, "label": int(d.target[i]), "index": int(i)}


_LOCK = threading.Lock()
_ARRAYS: dict = {}


def build_dataset(data_dir: str) -> FdistillDigits:
    """The prepared builder in `data_dir`, writing the ArrayRecord files on first use (offline)."""
    tfds.disable_progress_bar()
    try:
        return tfds_build.prepare_once(lambda: FdistillDigits(data_dir=data_dir, file_format="array_record"),
                                       data_dir, "fdistill_digits")
    finally:
        tfds.enable_progress_bar()


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [n, 8, 8, 1] in [-1, 1], labels int32 [n]) of a split, in `index` order."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not known; allowed: ['train', 'test']")
    key = (os.path.abspath(data_dir), split)
    with _LOCK:
        if key not in _ARRAYS:
            builder = build_dataset(data_dir)
            source = builder.as_data_source(split=split)
            records = tfds_build.read_records(source, range(len(source)), builder.data_dir)
            order = np.argsort([r["index"] for r in records])
            x = np.stack([records[i]["image"] for i in order]).astype(np.float32)
            y = np.asarray([records[i]["label"] for i in order], np.int32)
            _ARRAYS[key] = (x, y)
        return _ARRAYS[key]


def upsample(x: np.ndarray, resolution: int) -> np.ndarray:
    """Bilinear resize of [n, 8, 8, 1] images to `resolution` (8 = unchanged)."""
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"config.data.resolution={resolution!r} is not supported; allowed: {list(RESOLUTIONS)}")
    if resolution == x.shape[1]:
        return x
    import jax

    y = jax.image.resize(x, (x.shape[0], resolution, resolution, x.shape[3]), "bilinear")
    return np.clip(np.asarray(y, np.float32), -1.0, 1.0)


class DigitsSource:
    """The `DataSource` for digits (see `fdistill.data` and the module docstring)."""

    num_classes = NUM_CLASSES

    def __init__(self, data_config):
        self.config = data_config
        self.resolution = int(data_config.get("resolution", 8))
        self.data_dir = image_lib.data_dir_from_config(data_config)
        self.seed = int(data_config.get("seed", 0))
        x, self.labels = load_split(self.data_dir, "train")
        self.images = upsample(x, self.resolution)
        self.shape = tuple(self.images.shape[1:])
        self.shuffler = image_lib.EpochShuffler(len(self.images), self.seed)
        self._classifier = None
        self._reference_features = None

    # ----- data -------------------------------------------------------------------------------
    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's rows of the global batch of `step` (a function of (seed, step) only)."""
        idx = self.shuffler.indices(step, global_batch, process_index, process_count)
        return {"x": self.images[idx], "label": self.labels[idx]}

    def reference(self, n: int, seed: int = 12345) -> np.ndarray:
        """n training images (without replacement while n <= 1500)."""
        rng = np.random.default_rng([self.seed, 2, seed])
        idx = np.concatenate([rng.permutation(len(self.images)) for _ in range(-(-n // len(self.images)))])
        return self.images[idx[:n]]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images at this source's resolution, labels) of 'train' or 'test'."""
        x, y = load_split(self.data_dir, name)
        return upsample(x, self.resolution), y

    # ----- metrics ----------------------------------------------------------------------------
    @property
    def classifier(self):
        if self._classifier is None:
            from fdistill.evaluation import digits_classifier

            self._classifier = digits_classifier.load_or_train(
                self.data_dir, self.resolution, self.split("train"), self.split("test"))
        return self._classifier

    def reference_features(self) -> np.ndarray:
        if self._reference_features is None:
            self._reference_features = self.classifier.features(self.images)
        return self._reference_features

    def evaluate_samples(self, x, labels=None) -> dict[str, float]:
        """fd_digits, fd_digits_inf, precision, recall (k = 3, against the train split), class_entropy,
        class_tv, nonfinite_frac (and label_accuracy when `labels` are the classes the samples were
        conditioned on)."""
        x = np.asarray(x, np.float32)
        if x.shape[1:] != self.shape:
            raise ValueError(f"samples have shape {x.shape[1:]}, the digits source has {self.shape}")
        finite = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
        x = np.clip(np.nan_to_num(x, nan=0.0), -1.0, 1.0)  # an image is displayed clipped
        feats, probs = self.classifier.features_and_probs(x)
        metrics = feature_metrics.feature_sample_metrics(self.reference_features(), feats, prefix="fd_digits")
        pred = probs.argmax(1)
        metrics["class_entropy"] = feature_metrics.class_entropy(pred, NUM_CLASSES)
        metrics["class_tv"] = feature_metrics.class_tv(pred, self.labels, NUM_CLASSES)
        metrics["nonfinite_frac"] = float(1.0 - finite.mean())
        if labels is not None:
            metrics["label_accuracy"] = float(np.mean(pred == np.asarray(labels)))
        return metrics

    def plot_samples(self, x, path: str, title: str = "") -> str:
        return image_lib.plot_image_grid(x, path, title)


def make_source(data_config) -> DigitsSource:
    return DigitsSource(data_config)
