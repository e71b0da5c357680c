"""Sample datasets for diffusion objectives: `build(config.data)` returns a `DataSource`.

A data source knows its per-example shape, yields process-local batches that are a deterministic
function of (seed, step) (so resuming and changing the device count never change the data), and
knows how to score and picture model samples:

    source.shape                    per-example shape, e.g. (2,) or (16, 16, 1)
    source.num_classes              0 when unconditional
    source.batch(step, global_batch, process_index, process_count) -> {'x': float32 [local, *shape]
                                    (, 'label': int32 [local])}
    source.reference(n, seed)       n data samples as NumPy (for metrics)
    source.evaluate_samples(x, labels=None) -> dict of float metrics of model samples x
    source.plot_samples(x, path, title)  writes a PNG picture of model samples
"""
from __future__ import annotations

import importlib

from fdistill.configs import ConfigError

# name -> module defining `make_source(data_config)`; imported lazily.
SOURCES = {
    "gmm": "fdistill.data.gmm_source",
    "digits": "fdistill.data.digits",
    "tfds": "fdistill.data.tfds_images",  # config.data.name = 'tfds:<dataset name>'
}


def build(data_config):
    """The data source named by `config.data.name` ('gmm', 'digits' or 'tfds:<name>')."""
    name = data_config.name
    key = name.split(":", 1)[0] if name.startswith("tfds:") else name
    if key not in SOURCES:
        raise ConfigError(
            f"config.data.name={name!r} is not a known dataset; allowed: "
            f"{sorted(k for k in SOURCES if k != 'tfds')} or 'tfds:<name>'"
        )
    return importlib.import_module(SOURCES[key]).make_source(data_config)


# per-example shapes of TFDS image data sets, known without opening them: (height, width, channels)
KNOWN_SHAPES = {"cifar10": (32, 32, 3), "imagenet_resized/64x64": (64, 64, 3), "imagenet_resized/32x32": (32, 32, 3),
                "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1)}


def known_shape(data_config) -> tuple[int, ...]:
    """The per-example shape of `config.data` without reading the data set (tools that only need
    shapes: parameter counts, checkpoint conversion); a ValueError when it is not known."""
    name = str(data_config.name)
    if name == "gmm":
        return (int(data_config.dim),)
    if name == "digits":
        return (int(data_config.resolution), int(data_config.resolution), 1)
    dataset = name.split(":", 1)[1] if name.startswith("tfds:") else name
    if dataset in KNOWN_SHAPES:
        return KNOWN_SHAPES[dataset]
    raise ValueError(f"the shape of config.data.name={name!r} is not known without its data (known TFDS sets: "
                     f"{sorted(KNOWN_SHAPES)})")
