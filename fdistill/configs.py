"""Loading experiment configs (`ml_collections_configs/<name>.py` files defining `get_config()`)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ml_collections_configs")


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file given as a path or as a name in ml_collections_configs/."""
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    if not os.path.exists(path):
        available = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
        raise FileNotFoundError(f"config {name_or_path!r} not found; available in {CONFIG_DIR}: {available}")
    spec = importlib.util.spec_from_file_location(f"fdistill_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
