"""Any locally prepared TFDS image dataset as a diffusion `DataSource` (`config.data.name='tfds:<name>'`).

For users who have e.g. CIFAR-10 (`tfds:cifar10`) or ImageNet 64x64 (`tfds:imagenet_resized/64x64`)
prepared in ArrayRecord format under `config.data.data_dir` (else $FDISTILL_DATA_DIR, else
~/.cache/fdistill/tfds). Nothing is downloaded unless `config.data.allow_download = True`; a missing
dataset fails at start-up with the command that prepares it. Records are read by random access with
`builder.as_data_source()` (no TensorFlow; encoded `Image` features are decoded by PIL/OpenCV), one
batch at a time, so the dataset never has to fit in memory.

Fields: `config.data.split` ('train'), `image_key` ('image'; uint8 [0, 255] or float [-1, 1]),
`label_key` ('label'; '' or a missing feature = unconditional), `seed`, `num_reference` (5000 train
images for metrics), `feature_fn` ('' = `pixels`, or 'package.module:function' mapping images
[n, H, W, C] in [-1, 1] to features [n, d], e.g. an Inception port for FID). Batches follow
`fdistill.data.images.EpochShuffler` (deterministic in (seed, step); resumes from `state.step`).

Metrics: `fd_<features>` (Frechet distance to `num_reference` train images) and k-NN
`precision`/`recall` (k = 3) in the chosen features. The default `pixels` features are the images
average-pooled to at most 8x8 per channel: a cheap sanity metric, not FID. With
`feature_fn='fdistill.evaluation.fid:inception'` (weights: `config.eval.inception_weights`)
`fd_inception` is FID against `num_reference` train images, and `fid_reference` (an `.npz` of
`mu`, `sigma`, e.g. EDM's `cifar10-32x32.npz`) adds `fid` against those statistics, the papers' number.
"""
from __future__ import annotations

import importlib

import numpy as np
import tensorflow_datasets as tfds

from fdistill.configs import ConfigError
from fdistill.data import images as image_lib
from fdistill.data import tfds_build
from fdistill.evaluation import feature_metrics


def pixel_features(x: np.ndarray) -> np.ndarray:
    """Images [n, H, W, C] average-pooled to at most 8x8 per channel and flattened."""
    x = np.asarray(x, np.float32)
    n, h, w, c = x.shape
    fh, fw = max(1, h // 8), max(1, w // 8)
    x = x[:, : h // fh * fh, : w // fw * fw]
    x = x.reshape(n, h // fh, fh, w // fw, fw, c).mean(axis=(2, 4))
    return x.reshape(n, -1)


def resolve_feature_fn(spec: str):
    """(name, function) from `config.data.feature_fn` ('' / 'pixels' or 'module:function')."""
    if not spec or spec == "pixels":
        return "pixels", pixel_features
    if ":" not in spec:
        raise ConfigError(f"config.data.feature_fn={spec!r} must be 'pixels' or 'package.module:function'")
    module, fn = spec.split(":", 1)
    try:
        return fn, getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config.data.feature_fn={spec!r} could not be imported: {e}") from e


def open_builder(name: str, data_dir: str, allow_download: bool = False):
    """The prepared TFDS builder `name` in `data_dir`; a clear error when it is missing."""
    field = f"config.data.name='tfds:{name}'"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        raise FileNotFoundError(
            f"{field}: TFDS knows no dataset {name!r} and none is prepared in config.data.data_dir={data_dir!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not builder.is_prepared():
        if not allow_download:
            raise FileNotFoundError(
                f"{field}: the dataset is not prepared in config.data.data_dir={data_dir!r} and downloading is "
                f"off. Prepare it once (e.g. `tfds build {name} --data_dir={data_dir} --file_format=array_record`) "
                "or set config.data.allow_download=True"
            )
        builder = tfds_build.prepare_once(lambda: tfds.builder(name, data_dir=data_dir, file_format="array_record"),
                                          data_dir, name)
    fmt = getattr(builder.info, "file_format", None)
    fmt = str(getattr(fmt, "value", fmt) or "").lower()
    if fmt and "array_record" not in fmt:
        raise ValueError(
            f"{field}: prepared in {fmt!r} format in {data_dir!r}; random access needs ArrayRecord. Re-prepare "
            f"with `tfds build {name} --data_dir={data_dir} --file_format=array_record`"
        )
    return builder


class TFDSImageSource:
    """The `DataSource` for a prepared TFDS image dataset (see the module docstring)."""

    def __init__(self, data_config):
        self.config = data_config
        self.name = data_config.name.split(":", 1)[1]
        if not self.name:
            raise ConfigError("config.data.name='tfds:' needs a dataset name, e.g. 'tfds:cifar10'")
        self.data_dir = image_lib.data_dir_from_config(data_config)
        self.seed = int(data_config.get("seed", 0))
        builder = open_builder(self.name, self.data_dir, bool(data_config.get("allow_download", False)))
        features = builder.info.features
        self.image_key = data_config.get("image_key", "image")
        if self.image_key not in features:
            raise ConfigError(f"config.data.image_key={self.image_key!r} is not a feature of {self.name!r}; "
                             f"features: {sorted(features.keys())}")
        label_key = data_config.get("label_key", "label")
        self.label_key = label_key if label_key and label_key in features else ""
        self.num_classes = int(getattr(features[self.label_key], "num_classes", 0) or 0) if self.label_key else 0
        split = data_config.get("split", "train")
        if split not in builder.info.splits:
            raise ConfigError(f"config.data.split={split!r} is not a split of {self.name!r}; "
                             f"allowed: {sorted(builder.info.splits.keys())}")
        self.dataset_dir = str(builder.data_dir)
        self.regenerate = (f"tfds build {self.name} --data_dir={self.data_dir} --file_format=array_record "
                           "--overwrite")
        self.records = builder.as_data_source(split=split)
        self.shape = tuple(int(d) for d in features[self.image_key].shape)
        if len(self.shape) != 3 or None in self.shape:
            raise ValueError(f"{self.name!r}: feature {self.image_key!r} has shape {self.shape}; "
                             "need fixed-size images [H, W, C]")
        self.shuffler = image_lib.EpochShuffler(len(self.records), self.seed)
        self.feature_name, self.feature_fn = resolve_feature_fn(data_config.get("feature_fn", ""))
        self._reference_features = None
        self.fid_reference = self._fid_reference(data_config)

    def _fid_reference(self, data_config):
        """(mu, sigma) of `data.fid_reference`, or None; with FID's Inception features the weights
        must be available now, not at the first evaluation."""
        from fdistill.evaluation import fid

        if self.feature_fn is fid.inception:
            fid.inception_weights_path()  # a clear error naming config.eval.inception_weights
        path = data_config.get("fid_reference", "")
        if not path:
            return None
        if self.feature_fn is not fid.inception:
            raise ConfigError(f"config.data.fid_reference={path!r} holds Inception statistics; it needs "
                             "config.data.feature_fn='fdistill.evaluation.fid:inception'")
        return fid.load_statistics(path)

    def read(self, indices) -> dict:
        records = tfds_build.read_records(self.records, indices, self.dataset_dir, self.regenerate)
        out = {"x": image_lib.to_unit_range(np.stack([r[self.image_key] for r in records]))}
        if self.label_key:
            out["label"] = np.asarray([r[self.label_key] for r in records], np.int32)
        return out

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's rows of the global batch of `step` (a function of (seed, step) only)."""
        return self.read(self.shuffler.indices(step, global_batch, process_index, process_count))

    def reference(self, n: int, seed: int = 12345) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, seed])
        return self.read(rng.choice(len(self.records), n, replace=n > len(self.records)))["x"]

    def reference_features(self) -> np.ndarray:
        if self._reference_features is None:
            n = min(int(self.config.get("num_reference", 5000)), len(self.records))
            self._reference_features = np.asarray(self.feature_fn(self.reference(n, seed=0)))
        return self._reference_features

    def evaluate_samples(self, x, labels=None) -> dict[str, float]:
        x = np.asarray(x, np.float32)
        finite = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
        x = np.clip(np.nan_to_num(x, nan=0.0), -1.0, 1.0)
        features = np.asarray(self.feature_fn(x))
        metrics = feature_metrics.feature_sample_metrics(self.reference_features(), features,
                                                         prefix=f"fd_{self.feature_name}")
        if self.fid_reference is not None:  # FID against published statistics (e.g. EDM's cifar10-32x32.npz)
            from fdistill.evaluation import fid

            metrics["fid"] = fid.fid(*fid.statistics(features), *self.fid_reference)
        metrics["nonfinite_frac"] = float(1.0 - finite.mean())
        return metrics

    def plot_samples(self, x, path: str, title: str = "") -> str:
        return image_lib.plot_image_grid(x, path, title)


def make_source(data_config) -> TFDSImageSource:
    return TFDSImageSource(data_config)
