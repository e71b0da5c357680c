"""Model registry: `build(model_config, data_shape)` returns a Flax module F(x_in, c_noise)."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

# name -> (module, class); imported lazily so that optional models cost nothing.
MODELS = {
    "mlp": ("fdistill.models.mlp", "MLPDenoiserNet"),
    "unet": ("fdistill.models.unet", "UNet"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_count(params) -> int:
    """Elements of every leaf of `params` (arrays or ShapeDtypeStructs)."""
    return int(sum(x.size for x in jax.tree.leaves(params)))


def compute_dtype(name: str):
    """Activation dtype from `config.train.compute_dtype` (parameters stay float32)."""
    if name not in DTYPES:
        raise ValueError(f"config.train.compute_dtype={name!r} is not known; allowed: {list(DTYPES)}")
    return DTYPES[name]


def build(model_config, data_shape: tuple[int, ...], dtype: str = "float32"):
    """Instantiates `config.model.name` for data of per-example shape `data_shape`.

    All remaining fields of `model_config` but `parametrisation` (what the network's output means:
    `fdistill.denoiser.build_denoiser`) are passed to the module constructor.
    """
    name = model_config.name
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r} is not a known model; allowed: {sorted(MODELS)}")
    module, cls = MODELS[name]
    kwargs = {k: v for k, v in model_config.to_dict().items() if k not in ("name", "parametrisation")}
    if name == "mlp":
        kwargs["out_dim"] = data_shape[-1]
    else:
        kwargs["out_channels"] = data_shape[-1]
    return getattr(importlib.import_module(module), cls)(dtype=compute_dtype(dtype), **kwargs)
