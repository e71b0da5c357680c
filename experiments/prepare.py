"""Trains the runs a config names but that do not exist yet (SFT policies, reference and teacher score runs).

    python -m experiments.prepare --config ml_collections_configs/synthetic_dpo.py --workdir runs/synthetic_dpo \
        [--config.a.b=v ...] [--steps N] [--dry_run]

A config names the other runs it needs by their workdir (`fdistill.runs.DEPENDENCIES`):

    config field       made with (ml_collections_configs/)       sections copied from the config
    po.sft_workdir     synthetic_sft                            task, model
    dpo.reference      gmm_score / digits_score (config.data)   data, model, diffusion
    distill.teacher    gmm_score / digits_score (config.data)   data, diffusion
                       (gmm_flow for objective boss on gmm)

For each field the config uses, a finished run there is checked and kept; otherwise the making
config, with the listed sections of this config (so the run matches it), is trained into the named
workdir, or into `<--workdir>/<sft|reference|teacher>` when the field is empty. Re-running resumes an
unfinished dependency. It prints where it writes and the `experiments.run` command that then trains
the config itself. `--steps N` trains the dependencies for N steps instead of their config's
number (quick smoke runs); `--dry_run` only prints the plan. `--config.*` overrides apply as in
`experiments.run`.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys

from absl import app, flags

from experiments import run as run_cli  # the --config / --workdir flags and their override check

_STEPS = flags.DEFINE_integer("steps", 0, "Training steps of the dependencies (0: their config's).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only print what would be trained where.")


@dataclasses.dataclass
class Step:
    field: str  # e.g. 'po.sft_workdir'
    make_with: str  # config name in ml_collections_configs/
    workdir: str
    finished: bool


def plan(config, workdir: str) -> list[Step]:
    """The dependencies `config` uses, with the config that makes each and the workdir it goes to."""
    from fdistill import runs

    steps = []
    for field, dep in runs.DEPENDENCIES.items():
        if field.split(".")[0] not in config or not dep.needed(config):
            continue
        name = dep.config_name(config)
        if name is None:
            raise ValueError(f"no config in ml_collections_configs/ makes the {'/'.join(dep.objectives)} run of "
                             f"config.{field} for config.data.name={config.data.name!r}; train one with "
                             f"experiments.run and name its workdir in config.{field}")
        target = runs.field_value(config, field) or os.path.join(workdir, dep.subdir)
        steps.append(Step(field, name, target, os.path.exists(os.path.join(target, "results.json"))))
    return steps


def dependency_config(config, step: Step, num_steps: int = 0):
    """The config that makes `step`'s run: its experiment file with the shared sections of `config`."""
    from fdistill import configs, runs

    c = configs.load(step.make_with)
    for section in runs.DEPENDENCIES[step.field].shared:
        c[section] = configs.ConfigDict(config[section].to_dict())
    if num_steps:
        c.train.num_steps = num_steps
    return c


def prepare(config, workdir: str, num_steps: int = 0, dry_run: bool = False) -> dict[str, str]:
    """Trains every missing dependency of `config` (see the module docstring); returns
    {field: workdir} of the fields that were empty (the caller sets them)."""
    from fdistill import configs, runs, train

    config = configs.complete(config)
    empty = {}
    for step in plan(config, workdir):
        where = f"ml_collections_configs/{step.make_with}.py"
        if not runs.field_value(config, step.field):
            empty[step.field] = step.workdir
        if step.finished:
            print(f"[prepare] config.{step.field}: {step.workdir} is finished", flush=True)
        else:
            shared = ", ".join(f"config.{s}" for s in runs.DEPENDENCIES[step.field].shared)
            print(f"[prepare] config.{step.field}: {'would train' if dry_run else 'training'} {where} into "
                  f"{step.workdir} (with {shared} of this config)", flush=True)
            if dry_run:
                continue
            dep_config = dependency_config(config, step, num_steps)
            for field, wd in prepare(dep_config, step.workdir, num_steps).items():  # its own dependencies first
                set_field(dep_config, field, wd)
            train.train_and_evaluate(dep_config, step.workdir)
        if not dry_run:  # the check the objective makes when it opens the run
            set_field(config, step.field, step.workdir)
            runs.open_dependency(config, step.field)
    return empty


def set_field(config, field: str, value) -> None:
    section, name = field.split(".")
    config[section][name] = value


def run_command(argv: list[str], empty: dict[str, str]) -> str:
    """The `experiments.run` command of this invocation: its arguments without prepare's own flags,
    plus the fields that were empty."""
    args, skip = [], False
    for a in argv:
        name = a.split("=")[0]
        if skip or name in ("--steps", "--dry_run", "--nodry_run") or name.removeprefix("--config.") in empty:
            skip = name == "--steps" and "=" not in a and not skip
            continue
        args.append(a)
    args += [f"--config.{field}={wd}" for field, wd in empty.items()]
    return "python -m experiments.run " + " ".join(shlex.quote(a) for a in args)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    empty = prepare(run_cli._CONFIG.value, run_cli._WORKDIR.value, _STEPS.value, _DRY_RUN.value)
    print(f"[prepare] {'then' if _DRY_RUN.value else 'now'} run: {run_command(sys.argv[1:], empty)}", flush=True)


if __name__ == "__main__":
    run_cli.check_config_overrides(sys.argv)
    app.run(main)
