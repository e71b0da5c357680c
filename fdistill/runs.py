"""Runs that need other runs: teachers, SFT policies and references are named by their workdir.

A run that depends on another (a student on its teacher, DPO on its SFT policy, Diffusion-DPO on
its reference) names the other's workdir in its config. Nothing is trained on demand: a missing or
unfinished run is an error that says how to make it (`experiments.run` with the config to use).
`DEPENDENCIES` lists the fields that name runs; `python -m experiments.prepare --config CFG
--workdir DIR` trains the runs a config names that do not exist yet.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

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


def stored_params(run: FinishedRun, dtype=None):
    """The parameters a finished run samples with (its EMA when it keeps one, else its parameters)
    in its latest readable checkpoint, as a `checkpoint.StoredTree`: a frozen network that the
    training loop reads straight onto its shardings (`Objective.frozen()` may return it)."""
    from fdistill import checkpoint

    return checkpoint.StoredTree.latest(run.workdir, (("ema_params",), ("params",)), dtype)


def restore_params(run: FinishedRun):
    """`stored_params(run)` read to host NumPy arrays (tools, tables, tests)."""
    return stored_params(run).numpy()


def stored_generator(run: FinishedRun):
    """The generator parameters a finished distillation run samples with (its EMA when it keeps
    one) as a `checkpoint.StoredTree`: `params['gen']` beside the critics, or the whole tree of a
    'kd' run."""
    from fdistill import checkpoint

    keys = (("ema_params",), ("params",)) if run.config.objective == "kd" else (("ema_params", "gen"), ("params", "gen"))
    return checkpoint.StoredTree.latest(run.workdir, keys)


def restore_generator(run: FinishedRun):
    """`stored_generator(run)` read to host NumPy arrays."""
    return stored_generator(run).numpy()


# ----- config fields that name other runs ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dependency:
    """A config field (`section.name`) holding the workdir of another run.

    `objectives`: what that run must be. `make_with`: the experiment config (in
    ml_collections_configs/) that makes it, by '<objective>:<data name>' or `config.data.name` of the
    config naming it ('*': any).
    `shared`: sections the run must have in common with the config naming it (checked on opening,
    copied by `experiments.prepare`). `needed(config)`: whether the config uses the field at all.
    `subdir`: the sub-workdir `experiments.prepare` trains into when the field is empty.
    """

    objectives: tuple[str, ...]
    make_with: dict[str, str]
    shared: tuple[str, ...]
    subdir: str
    needed: Callable[[configs.ConfigDict], bool] = lambda config: True
    allow_unfinished: str = ""  # a boolean field of the same section allowing an unfinished run

    def config_name(self, config) -> str | None:
        """The config that makes the run: `make_with['<objective>:<data>']`, else by data name, else '*'."""
        data = str(config.data.name).split(":")[0] if "data" in config else ""
        for key in (f"{config.objective}:{data}", data, "*"):
            if key in self.make_with:
                return self.make_with[key]
        return None


SCORE_CONFIGS = {"gmm": "gmm_score", "digits": "digits_score"}
DIFFUSION_RUNS = ("score", "flow")  # networks with a denoiser (a flow run's velocity converts exactly)
STUDENT_RUNS = ("distill", "kd", "dmd2_multistep", "tdm")  # one- or few-step generators of z
DEPENDENCIES: dict[str, Dependency] = {
    "po.sft_workdir": Dependency(("sft",), {"*": "synthetic_sft"}, ("task", "model"), "sft",
                                 needed=lambda c: configs.family_of(c.objective) == "po" and c.po.reference == "sft"),
    "po.reward_model": Dependency(("reward_model",), {"*": "synthetic_reward_model"}, ("task",), "reward_model",
                                  needed=lambda c: bool(c.po.reward_model)),
    "dpo.reference": Dependency(DIFFUSION_RUNS, SCORE_CONFIGS, ("data", "model", "diffusion"), "reference"),
    "rl.sampler": Dependency(DIFFUSION_RUNS + STUDENT_RUNS, SCORE_CONFIGS, ("data", "model", "diffusion"), "sampler"),
    "distill.teacher": Dependency(DIFFUSION_RUNS, {**SCORE_CONFIGS, "boss:gmm": "gmm_flow"}, ("data", "diffusion"),
                                  "teacher",
                                  needed=lambda c: c.distill.teacher != "analytic",
                                  allow_unfinished="allow_unfinished_teacher"),
}


def field_value(config, field: str):
    section, name = field.split(".")
    return config[section][name]


def open_dependency(config, field: str) -> FinishedRun:
    """The finished run named by `config.<field>` (a key of `DEPENDENCIES`), checked to hold the
    right objective and the same shared sections as `config`."""
    dep = DEPENDENCIES[field]
    section = field.split(".")[0]
    make_with = dep.config_name(config) or f"<a {'/'.join(dep.objectives)} config for config.data.name={config.data.name}>"
    allow = bool(config[section][dep.allow_unfinished]) if dep.allow_unfinished else False
    run = open_run(field_value(config, field), f"config.{field}", dep.objectives, make_with, allow)
    check_shared(config, run, field, dep.shared)
    return run


def check_shared(config, run: FinishedRun, field: str, sections: tuple[str, ...]) -> None:
    """Every field of `sections` equal in `config` and the run's config, except paths (`data_dir`),
    the sample metrics' features and references (`feature_fn`, `num_reference`, `fid_reference`)
    and, for stored datasets, the shuffling `data.seed` (for the mixture the seed places the modes);
    otherwise a ValueError listing the differences."""
    skip = {"data_dir", "feature_fn", "num_reference", "fid_reference"}  # paths and evaluation-only fields
    diffs = []
    for section in sections:
        ours, theirs = config[section].to_dict(), run.config[section].to_dict()
        ignore = skip | ({"seed"} if section == "data" and config.data.name != "gmm" else set())
        diffs += [f"config.{section}.{k}={ours.get(k)!r} (run: {theirs.get(k)!r})"
                  for k in sorted(set(ours) | set(theirs)) if k not in ignore and ours.get(k) != theirs.get(k)]
    if diffs:
        raise configs.ConfigError(f"config.{field}={run.workdir!r} was made with other {'/'.join(sections)} settings: "
                         f"{', '.join(diffs)}; use the run's values (python -m experiments.prepare copies them "
                         f"from the config that names the run)")
