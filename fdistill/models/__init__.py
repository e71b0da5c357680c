"""Model registry: `build(model_config, data_shape)` returns a Flax module F(x_in, c_noise)."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.configs import ConfigError

# name -> (module, class); imported lazily so that optional models cost nothing.
MODELS = {
    "mlp": ("fdistill.models.mlp", "MLPDenoiserNet"),
    "unet": ("fdistill.models.unet", "UNet"),
    "edm_ddpmpp": ("fdistill.models.edm_song", "SongUNet"),  # EDM's networks (arXiv 2206.00364)
    "edm_ncsnpp": ("fdistill.models.edm_song", "SongUNet"),
    "edm_adm": ("fdistill.models.edm_adm", "DhariwalUNet"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_count(params, buffers: tuple[tuple[str, ...], ...] = ()) -> int:
    """Elements of every leaf of `params` (arrays or ShapeDtypeStructs) but those at the key paths
    `buffers` (constants kept among the parameters, e.g. NCSN++'s Fourier frequencies)."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if tuple(str(getattr(k, "key", k)) for k in path) not in buffers:
            total += int(np.prod(np.shape(x)))
    return total


def network_param_count(name: str, params) -> int:
    """The parameter count of a `config.model.name` network as its authors count it: without the
    constants its module lists in `BUFFERS` (EDM counts its networks' parameters, not buffers)."""
    module = importlib.import_module(MODELS[name][0]) if name in MODELS else None
    return param_count(params, getattr(module, "BUFFERS", ()))


def compute_dtype(name: str):
    """Activation dtype from `config.train.compute_dtype` (parameters stay float32)."""
    if name not in DTYPES:
        raise ConfigError(f"config.train.compute_dtype={name!r} is not known; allowed: {list(DTYPES)}")
    return DTYPES[name]


def build(model_config, data_shape: tuple[int, ...], dtype: str = "float32"):
    """Instantiates `config.model.name` for data of per-example shape `data_shape`.

    All remaining fields of `model_config` but `parametrisation` (what the network's output means:
    `fdistill.denoiser.build_denoiser`) are passed to the module constructor.
    """
    name = model_config.name
    if name not in MODELS:
        raise ConfigError(f"config.model.name={name!r} is not a known model; allowed: {sorted(MODELS)}")
    module, cls = MODELS[name]
    kwargs = {k: v for k, v in model_config.to_dict().items() if k not in ("name", "parametrisation")}
    if name == "mlp":
        kwargs["out_dim"] = data_shape[-1]
    else:
        kwargs["out_channels"] = data_shape[-1]
    return getattr(importlib.import_module(module), cls)(dtype=compute_dtype(dtype), **kwargs)
