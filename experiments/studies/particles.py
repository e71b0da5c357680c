"""The f-distill update without a generator network: is the objective or the generator what keeps a
mixture student's modes smeared? (issue "The main job's student is a curve"; results in
`experiments/results/student_quality.md`).

    python -m experiments.studies.particles --workdir runs/gmm_fdistill [--iterations 2000] \
        [--step_size 0.002] [--num_particles 4096] [--out particles.md]

The samples of a finished one-step mixture student become free particles, and each iteration moves
every particle by the generator's own update with the exact critic
(`fdistill.distillation.particles`: x <- x - step_size (D_fake - D_real) w h, the run's divergence,
noise range, ratio clip and DMD weight). This is gradient descent on the distillation loss with one
free parameter per sample. If the particles gather into the teacher's modes, the objective and its
noise levels are right and the smear is the generator network's. Prints the high-quality
fraction, mode-weight TV, coverage and each mode's major-axis std
(`fdistill.evaluation.samples.mode_shapes`) along the way, and draws before/after panels.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments.tables.common import final_samples, plot_panels
from fdistill import objectives, runs
from fdistill.distillation.particles import particle_update
from fdistill.evaluation.samples import high_quality_frac, mode_coverage, mode_shapes, mode_weight_tv

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished one-step distillation run on the analytic mixture.")
_ITERATIONS = flags.DEFINE_integer("iterations", 2000, "Particle updates.")
_STEP = flags.DEFINE_float("step_size", 0.002, "x <- x - step_size g.")
_NUM = flags.DEFINE_integer("num_particles", 4096, "Particles (the student's samples).")
_REPORTS = flags.DEFINE_integer("reports", 5, "Rows printed besides iteration 0.")
_OUT = flags.DEFINE_string("out", None, "Markdown table to write (and OUT's .png: before/after panels).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _ITERATIONS.value < 1 or _NUM.value < 1024 or _STEP.value <= 0 or _REPORTS.value < 1:
        raise app.UsageError("--iterations >= 1, --num_particles >= 1024, --step_size > 0 and --reports >= 1 needed")
    logging.set_verbosity(logging.WARNING)
    run = runs.open_run(_WORKDIR.value, "--workdir", ("distill",), "gmm_fdistill")
    objective = objectives.build(run.config)
    gmm = getattr(objective.source, "gmm", None)
    if gmm is None or run.config.distill.teacher != "analytic":
        raise app.UsageError(f"--workdir={_WORKDIR.value!r}: the particle check needs a run on the analytic "
                             "mixture (config.data.name='gmm', config.distill.teacher='analytic')")
    step = particle_update(objective, objective.frozen())
    x = jnp.asarray(np.asarray(final_samples(objective, run.workdir, _NUM.value)), jnp.float32)
    start = np.asarray(x)
    heaviest = np.argsort(-np.asarray(gmm.weights), kind="stable")
    every = max(_ITERATIONS.value // _REPORTS.value, 1)
    levels = objective.levels
    lines = [f"Particles: {_NUM.value} samples of {_WORKDIR.value}, moved by its generator update with the exact "
             f"critic ({run.config.distill.divergence}, grid indices {levels.lo}..{levels.hi_final}, "
             f"step size {_STEP.value:g}).", "",
             "| iteration | high-quality frac | mode-weight TV | coverage | major std per mode, heaviest first |",
             "|---|---|---|---|---|"]
    key = jax.random.key(0)
    for it in range(_ITERATIONS.value + 1):
        if it % every == 0 or it == _ITERATIONS.value:
            xn = np.asarray(x)
            major = " ".join(f"{v:.1f}" for v in mode_shapes(xn, gmm)["major"][heaviest])
            lines.append(f"| {it} | {high_quality_frac(xn, gmm):.3f} | {mode_weight_tv(xn, gmm):.3f} | "
                         f"{mode_coverage(xn, gmm):.2f} | {major} |")
            print(lines[-1], flush=True)
        if it < _ITERATIONS.value:
            key, k = jax.random.split(key)
            x = step(x, k, _STEP.value)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            f.write("\n".join(lines) + "\n")
        end = np.asarray(x)
        plot_panels(os.path.splitext(_OUT.value)[0] + ".png", objective,
                    {"student": start, f"particles, {_ITERATIONS.value} updates": end},
                    {"student": f"hq {high_quality_frac(start, gmm):.2f}",
                     f"particles, {_ITERATIONS.value} updates": f"hq {high_quality_frac(end, gmm):.2f}"},
                    title="student samples and the same samples moved as particles (red) over teacher data (grey)")


if __name__ == "__main__":
    app.run(main)
