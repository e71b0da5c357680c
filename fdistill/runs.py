"""Runs that need other runs: teachers, SFT policies and references are named by their workdir.

A run that depends on another (a student on its teacher, DPO on its SFT policy, Diffusion-DPO on
its reference) names the other's workdir in its config. Nothing is trained on demand: a missing or
unfinished run is an error that says how to make it (`experiments.run` with the config to use).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from fdistill import configs


@dataclasses.dataclass
class FinishedRun:
    workdir: str
    config: configs.ConfigDict  # completed from its base
    results: dict | None  # results.json (None when unfinished and allowed)


def open_run(workdir: str, field: str, objectives: tuple[str, ...], make_with: str,
             allow_unfinished: bool = False) -> FinishedRun:
    """The run in `workdir`, named by the config field `field`, which must hold one of `objectives`
    and be finished (`results.json`) unless `allow_unfinished`. Errors name the field and the
    command that makes such a run (`make_with`, a config name in ml_collections_configs/)."""
    how = f"python -m experiments.run --config ml_collections_configs/{make_with}.py --workdir {workdir}"
    if not isinstance(workdir, str) or not workdir:
        raise ValueError(f"{field} is empty: name the workdir of a finished {'/'.join(objectives)!s} run; make one "
                         f"with: python -m experiments.run --config ml_collections_configs/{make_with}.py --workdir DIR")
    path = os.path.abspath(os.path.expanduser(workdir))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{field}={workdir!r} is not a run's workdir (no config.json); make it with: {how}")
    config = configs.load_json(cfg_path)
    if config.objective not in objectives:
        raise ValueError(f"{field}={workdir!r} holds a {config.objective!r} run; expected {' or '.join(map(repr, objectives))}")
    results = None
    results_path = os.path.join(path, "results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    elif not allow_unfinished:
        raise FileNotFoundError(f"{field}={workdir!r} is unfinished (no results.json); finish it by re-running: {how}")
    return FinishedRun(path, config, results)


def restore_params(run: FinishedRun):
    """The parameters a finished run samples with (its EMA when it keeps one, else its parameters),
    from its latest readable checkpoint, as device arrays."""
    from fdistill import checkpoint

    tree = checkpoint.restore_tree(run.workdir)
    params = tree.get("ema_params") or tree.get("params")
    if not params:
        raise KeyError(f"the checkpoint of {run.workdir!r} holds no parameters (keys {sorted(tree)})")
    return jax.tree.map(jnp.asarray, params)
