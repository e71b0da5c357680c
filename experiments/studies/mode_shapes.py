"""The shape of each mode a finished one-step (or K-step) mixture student draws: where its
high-quality fraction is lost (issue "The main job's student is a curve"; results in
`experiments/results/student_quality.md`).

    python -m experiments.studies.mode_shapes --workdirs runs/a,runs/b [--num_samples 16384] [--out shapes.md]

For each workdir (a finished distillation run on the analytic mixture) it draws the student's samples
with the run's own sampler and prints one row per mode, heaviest first
(`fdistill.evaluation.samples.mode_shapes`): the true weight, the student's share, the fraction of
the mode's samples within 3 stds (its high-quality fraction), and the std of its samples along their
largest and smallest principal axes in units of the mode's std (1 / 1 for the mixture itself). A
mode drawn as an arc shows major >> 1 with minor ~ 1.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging

from experiments.tables.common import final_samples
from fdistill import objectives, runs
from fdistill.evaluation.samples import high_quality_frac, mode_shapes

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Finished distillation runs on the analytic mixture.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16384, "Student samples per run.")
_OUT = flags.DEFINE_string("out", None, "Also write the tables to this markdown file.")
flags.mark_flags_as_required(["workdirs"])


def shape_table(workdir: str, num_samples: int) -> list[str]:
    """Markdown lines: the run's per-mode table (module docstring)."""
    run = runs.open_run(workdir, "--workdirs", runs.STUDENT_RUNS, "gmm_fdistill")
    objective = objectives.build(run.config)
    gmm = getattr(objective.source, "gmm", None)
    if gmm is None:
        raise app.UsageError(f"--workdirs: {workdir!r} is a {run.config.data.name!r} run; mode shapes need the "
                             "analytic mixture (config.data.name='gmm')")
    x = np.asarray(final_samples(objective, run.workdir, num_samples))
    s = mode_shapes(x, gmm)
    lines = [f"### {workdir}", "",
             f"{num_samples} samples; high-quality fraction {high_quality_frac(x, gmm):.3f}.", "",
             "| mode | weight | share | within 3 std | major std | minor std |", "|---|---|---|---|---|---|"]
    for k in np.argsort(-s["weight"], kind="stable"):
        lines.append(f"| {k} | {s['weight'][k]:.3f} | {s['share'][k]:.3f} | {s['within3'][k]:.2f} | "
                     f"{s['major'][k]:.2f} | {s['minor'][k]:.2f} |")
    return lines + [""]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _NUM_SAMPLES.value < 1024:
        raise app.UsageError(f"--num_samples={_NUM_SAMPLES.value} must be >= 1024")
    logging.set_verbosity(logging.WARNING)
    lines = []
    for workdir in _WORKDIRS.value:
        lines += shape_table(workdir, _NUM_SAMPLES.value)
    text = "\n".join(lines)
    print(text, flush=True)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
