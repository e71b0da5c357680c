"""Parameters of a config's denoiser network, counted from shapes (nothing allocated, no data read).

    python -m experiments.count_params --config ml_collections_configs/cifar10_edm_score.py
    python -m experiments.count_params --config ml_collections_configs/cifar10_edm_score.py --config.model.num_classes=0
    python -m experiments.count_params --config ml_collections_configs/cifar10_edm_score.py --config.model.name=edm_ncsnpp

prints `parameters: <int>` (and the network and data shape on stderr). The per-example data shape
comes from the data section without opening the data set: the mixture's dimension, the digits'
resolution, the known image shape of a TFDS data set (`fdistill.data.KNOWN_SHAPES`), or `--shape H,W,C`. A changed
`--config.model.name` takes that network's defaults for the fields the config does not set.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags


def data_shape(config, shape_flag: str = "") -> tuple[int, ...]:
    """The per-example shape of `config.data` (`fdistill.data.known_shape`), or of `shape_flag` ('32,32,3')."""
    from fdistill import data

    if shape_flag:
        return tuple(int(v) for v in shape_flag.split(","))
    try:
        return data.known_shape(config.data)
    except ValueError as e:
        raise ValueError(f"{e}; pass --shape H,W,C") from None


def count(config, shape: tuple[int, ...]) -> int:
    """Parameters of `config.model` for data of per-example `shape`, from `jax.eval_shape` of its init."""
    import jax
    import jax.numpy as jnp

    from fdistill import denoiser, models

    net = denoiser.build_denoiser(config, shape)
    kw = {"labels": jnp.zeros((1,), jnp.int32)} if int(config.model.get("num_classes", 0) or 0) else {}
    params = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1,) + tuple(shape)), **kw), jax.random.PRNGKey(0))
    return models.network_param_count(config.model.name, params)


def with_model_defaults(config, original):
    """`config` whose `model.name` differs from the config file's (`original`): the new network's
    defaults, except the fields the file or the command line set (those differing from a default)."""
    from fdistill import configs

    if config.model.name == original.model.name:
        return config
    file_defaults = configs.model(original.model.name).to_dict()
    model = configs.model(config.model.name).to_dict()
    for k in model:
        if k == "name" or k not in config.model:
            continue
        set_in_file = k in file_defaults and original.model[k] != file_defaults[k]
        set_on_command_line = k in original.model and config.model[k] != original.model[k]
        if set_in_file or set_on_command_line:
            model[k] = config.model[k]
    out = config.copy_and_resolve_references()
    out.model = configs.ConfigDict(model)
    return out


def define_flags() -> None:
    """The command line's flags (defined only when run as a program: the functions above are imported by tests)."""
    global _CONFIG, _SHAPE
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=False)
    _SHAPE = flags.DEFINE_string("shape", "", "Per-example data shape, e.g. 32,32,3 (default: from config.data).")
    flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fdistill import configs

    try:
        original = configs.load(config_flags.get_config_filename(flags.FLAGS["config"]))
        config = with_model_defaults(_CONFIG.value, original)
        shape = data_shape(config, _SHAPE.value)
        n = count(config, shape)
    except (ValueError, configs.ConfigError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    sys.stderr.write(f"{config.model.name} for data {shape}\n")
    print(f"parameters: {n}")


if __name__ == "__main__":
    from experiments.cli import check_config_overrides

    check_config_overrides(sys.argv)
    define_flags()
    app.run(main)
