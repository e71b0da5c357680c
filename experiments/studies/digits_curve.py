"""fd_digits of one-step digits students against generator updates, next to the goal of 1.5 times
the 35-NFE teacher's (issue "The main job's student is a curve"; results in
`experiments/results/digits_curve.md`).

    python -m experiments.studies.digits_curve --workdir runs/digits_curve --teacher runs/digits_score \
        [--runs js,js_cosine] [--num_steps N] [--eval_every 200] [--num_samples 16384] [--seed 0[,1,...]]

Each run is `ml_collections_configs/digits_fdistill.py` (the best one-step digits setting of the
digits table: JS, lambda_gan 3e-3, discriminator on the fake score's bottleneck) with the overrides
in RUNS, trained for the run's generator updates in RUNS (or `--num_steps`) with an evaluation of
the student (`--num_samples` samples, 16384 by default: fd_digits_inf, fd_digits, precision, recall,
class entropy) and a checkpoint every `--eval_every` updates (and every 10 minutes), in
`WORKDIR/<run>` (`<run>_seed<N>` for a seed N > 0; `--seed 0,1` trains or reuses both seeds of each run and
draws them on one curve; re-running resumes or reuses finished runs).
Writes `WORKDIR/curve.md`, `WORKDIR/curve.json` (every evaluation) and `WORKDIR/curve.png`
(fd_digits_inf against updates, with the teacher's and the goal's levels).

The goal is judged on FD-infinity (`fd_digits_inf`, Chong & Forsyth's bias-corrected Frechet distance)
of 16384 samples. On 4096 samples (the earlier default) both the plug-in fd_digits and FD-infinity
vary too much between sample sets to judge a 1.5 x ratio: the teacher's plug-in value ranged over
1.93-2.72 and its FD-infinity over 0.94-1.81 on four disjoint sets of 4096 (`digits_curve.md`, tenth
session). Runs evaluated before `fd_digits_inf` existed fall back to fd_digits; a new `--num_samples`
re-evaluates a finished run's last checkpoint, which then has it. The teacher's 16384 samples take
about 7 minutes on one core, once per run: later invocations read its metrics from the run's cache/.
"""
from __future__ import annotations

import json
import os
import re
import textwrap
import time

from absl import app, flags, logging

from experiments.tables.common import check_choices, eval_curve, non_negative_ints, run_config, train_row
from fdistill import configs
from fdistill.evaluation import frechet
from fdistill.evaluation.digits_classifier import FEATURE_DIM

# run -> (what it changes, overrides of digits_fdistill.py, generator updates unless --num_steps)
COSINE_EMA = {"distill.gen_lr_schedule": "cosine", "distill.gen_ema_decay": 0.995}
BATCH64 = {**COSINE_EMA, "train.batch_size": 64}


def regression(weight: float) -> dict:
    """DMD's regression loss at `weight`, on 16 fresh noises per generator update."""
    return {"distill.lambda_reg": weight, "distill.reg_batch_size": 16}


RUNS = {
    "js": ("digits_fdistill.py as it is (constant learning rates)", {}, 2400),
    "js_cosine": ("generator learning rate decays to 0 (cosine)", {"distill.gen_lr_schedule": "cosine"}, 2400),
    "js_cosine_ema": ("cosine, and the student evaluated with an EMA of the generator (decay 0.995)",
                      COSINE_EMA, 4800),
    "js_cosine_ema_ttur5": ("cosine + EMA, 5 critic updates per generator update (DMD2's TTUR; 2 in the config)",
                            {**COSINE_EMA, "distill.fake_updates_per_gen": 5}, 2400),
    "js_cosine_ema_gan1e-2": ("cosine + EMA, GAN weight 1e-2 (3e-3 in the config)",
                              {**COSINE_EMA, "distill.lambda_gan": 1e-2}, 2400),
    "js_cosine_ema_gan3e-2": ("cosine + EMA, GAN weight 3e-2", {**COSINE_EMA, "distill.lambda_gan": 3e-2}, 2400),
    "js_cosine_ema_gan1e-1": ("cosine + EMA, GAN weight 1e-1", {**COSINE_EMA, "distill.lambda_gan": 1e-1}, 2400),
    "js_cosine_ema_batch64": ("cosine + EMA, batch 64 (32 in the config; about the cost of 5 critic updates)",
                              BATCH64, 2400),
    "js_cosine_ema_batch64_long": ("cosine + EMA, batch 64, twice the generator updates",
                                   BATCH64, 4800),
    "js_cosine_ema_batch64_lr2x": ("cosine + EMA, batch 64, every learning rate doubled (generator 2e-4, critics 4e-4)",
                                   {**BATCH64, "distill.lr_gen": 2e-4, "distill.lr_fake": 4e-4,
                                    "distill.lr_disc": 4e-4}, 2400),
    "js_cosine_ema_batch64_index100_600": (("cosine + EMA, batch 64, distillation noise indices 100..600 of the "
                                            "Karras grid (sigma 0.017..5.9; 20..980, sigma 0.003..72, in the config)"),
                                           {**BATCH64, "distill.gen_index_min": 100, "distill.gen_index_max": 600},
                                           2400),
    "js_cosine_ema_batch64_reg": (("cosine + EMA, batch 64, DMD's regression loss (weight 0.25, DMD's; MSE to the "
                                   "teacher's 35-NFE ODE endpoint of 16 fresh noises per update)"),
                                  {**BATCH64, **regression(0.25)}, 2400),
    "js_cosine_ema_batch64_reg0.1": (("cosine + EMA, batch 64, DMD's regression loss at weight 0.1 (16 noises per "
                                      "update)"),
                                     {**BATCH64, **regression(0.1)}, 2400),
    "js_cosine_ema_batch64_reg0.05": (("cosine + EMA, batch 64, DMD's regression loss at weight 0.05 (16 noises per "
                                       "update)"),
                                      {**BATCH64, **regression(0.05)}, 2400),
    "js_cosine_ema_batch64_reg0.1_critics_cosine": (("cosine + EMA, batch 64, regression weight 0.1, and the "
                                                     "critics' learning rates decay to 0 too (cosine)"),
                                                    {**BATCH64, **regression(0.1), "train.lr_schedule": "cosine"},
                                                    2400),
    "js_cosine_ema_batch64_reg0.1to0": (("cosine + EMA, batch 64, DMD's regression loss with a weight that falls "
                                         "linearly from 0.1 to 0 over the run (16 noises per update)"),
                                        {**BATCH64, **regression(0.1), "distill.lambda_reg_end": 0.0}, 2400),
    "js_cosine_ema_batch128_reg0.1": (("cosine + EMA, batch 128, DMD's regression loss at weight 0.1 (16 noises per "
                                       "update)"),
                                      {**COSINE_EMA, "train.batch_size": 128, **regression(0.1)}, 2400),
    "js_cosine_ema_batch256_reg": ("cosine + EMA, batch 256, DMD's regression loss (weight 0.25, 16 noises per update)",
                                   {**COSINE_EMA, "train.batch_size": 256, **regression(0.25)}, 2400),
    "js_cosine_ema_batch128": ("cosine + EMA, batch 128 (the samples of batch 64 over 4800 updates)",
                               {**COSINE_EMA, "train.batch_size": 128}, 2400),
    "js_cosine_ema_batch256": ("cosine + EMA, batch 256 (twice batch 128's samples)",
                               {**COSINE_EMA, "train.batch_size": 256}, 2400),
    "js_cosine_ema_batch512": ("cosine + EMA, batch 512 (twice batch 256's samples)",
                               {**COSINE_EMA, "train.batch_size": 512}, 2400),
    "js_cosine_ema_ttur5_gan3e-2": ("cosine + EMA, 5 critic updates, GAN weight 3e-2",
                                    {**COSINE_EMA, "distill.fake_updates_per_gen": 5, "distill.lambda_gan": 3e-2}, 2400),
    "js_cosine_ema_ttur5_gan1e-1": ("cosine + EMA, 5 critic updates, GAN weight 1e-1",
                                    {**COSINE_EMA, "distill.fake_updates_per_gen": 5, "distill.lambda_gan": 1e-1}, 2400),
}
GOAL = 1.5  # times the teacher's fd_digits_inf (fd_digits for runs evaluated before FD-infinity existed)
MIN_SAMPLES = frechet.FD_INF_SAMPLES_PER_DIM * FEATURE_DIM  # the fewest samples with an fd_digits_inf

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per run).")
_TEACHER = flags.DEFINE_string("teacher", None, "Workdir of the finished digits score teacher "
                               "(default: digits_fdistill.py's runs/digits_score).")
_RUNS = flags.DEFINE_list("runs", ["js"], f"Runs to train; allowed: {list(RUNS)}.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Generator updates per run (default: each run's own, RUNS).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 200, "Updates between evaluations.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16384, "Samples per evaluation (student and teacher); "
                                    "changing it on a finished run re-evaluates its last checkpoint.")
_SEEDS = flags.DEFINE_list("seed", ["0"], "Training seeds, comma-separated (a seed other than 0 trains in "
                           "WORKDIR/<run>_seed<N>).")
flags.mark_flags_as_required(["workdir"])


def run_of(name: str, seed: int = 0):
    """The run's config: digits_fdistill.py, RUNS' overrides, the teacher, evaluations every `--eval_every`."""
    overrides = dict(RUNS[name][1])
    if _TEACHER.value:
        overrides["distill.teacher"] = os.path.abspath(_TEACHER.value)
    c = run_config(configs.load("digits_fdistill"), seed, _NUM_STEPS.value or RUNS[name][2], overrides)
    c.train.eval_every = c.train.checkpoint_every = _EVAL_EVERY.value  # an hour-long run resumes
    c.train.checkpoint_every_secs = 600  # and a killed one loses at most 10 minutes
    c.eval.num_samples = _NUM_SAMPLES.value
    return c


def describe(label: str) -> str:
    """What run `label` (a RUNS name, with `_seed<N>` for a seed other than 0) changes."""
    return RUNS[re.sub(r"_seed\d+$", "", label)][0]


def judged_metric(curves: dict, teacher: dict) -> str:
    """`fd_digits_inf` (FD-infinity: without the plug-in FD's c / n bias, which pulls the ratio of two
    models toward 1) when the teacher and at least one evaluation of every run have it, else
    `fd_digits` (runs evaluated before FD-infinity was added)."""
    if "teacher/fd_digits_inf" in teacher and all(any("fd_digits_inf" in r for r in rows) for rows in curves.values()):
        return "fd_digits_inf"
    return "fd_digits"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(path: str, curves: dict, teacher_fd: float, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for name, rows in curves.items():
        rows = [r for r in rows if metric in r]
        label = textwrap.fill(f"{name}: {describe(name)}", 70, subsequent_indent="  ")  # a legend of readable width
        ax.plot([r["step"] for r in rows], [r[metric] for r in rows], "o-", ms=3, label=label)
    ax.axhline(teacher_fd, color="k", lw=1, label=f"teacher, 35 NFE ({teacher_fd:.2f})")
    ax.axhline(GOAL * teacher_fd, color="k", ls="--", lw=1, label=f"goal, {GOAL:g} x teacher ({GOAL * teacher_fd:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("generator updates")
    ax.set_ylabel(f"{metric} (1-step student, {_NUM_SAMPLES.value} samples)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_choices("runs", _RUNS.value, RUNS)
    if _TEACHER.value and not os.path.exists(os.path.join(_TEACHER.value, "config.json")):
        raise app.UsageError(f"--teacher={_TEACHER.value!r} is not a finished run's workdir (no config.json)")
    if (_NUM_STEPS.value is not None and _NUM_STEPS.value < 1) or _EVAL_EVERY.value < 1:
        raise app.UsageError(f"--num_steps={_NUM_STEPS.value} and --eval_every={_EVAL_EVERY.value} must be >= 1")
    if _NUM_SAMPLES.value < MIN_SAMPLES:
        raise app.UsageError(f"--num_samples={_NUM_SAMPLES.value} must be >= {MIN_SAMPLES} (fd_digits_inf, which "
                             f"judges the goal, needs {frechet.FD_INF_SAMPLES_PER_DIM} x the {FEATURE_DIM} feature "
                             "dimensions)")
    seeds = non_negative_ints("seed", _SEEDS.value, "seed", " (e.g. --seed 0,1)")
    if not seeds or len(set(seeds)) < len(seeds):
        raise app.UsageError(f"--seed={','.join(_SEEDS.value)!r}: expected one or more distinct seeds, e.g. --seed 0,1")
    logging.set_verbosity(logging.WARNING)
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    curves, teacher = {}, {}
    for name in _RUNS.value:
        for seed in seeds:
            label = name + (f"_seed{seed}" if seed else "")
            sub = os.path.join(workdir, label)
            print(f"[digits_curve] {label} -> {sub}", flush=True)
            results = train_row(run_of(name, seed), sub, label)
            teacher.update({k: v for k, v in results.items() if k.startswith("teacher/")})
            curves[label] = eval_curve(sub, "fd_digits")
    metric = judged_metric(curves, teacher)
    teacher_fd = teacher[f"teacher/{metric}"]
    lines = [f"# One-step digits students: {metric} against generator updates", "",
             (f"Teacher (35-NFE Heun): {metric} {teacher_fd:.2f} "
              f"(plug-in fd_digits {teacher['teacher/fd_digits']:.2f}, "
              f"{_NUM_SAMPLES.value} samples); goal {GOAL:g} x teacher = {GOAL * teacher_fd:.2f} in {metric}. "
              f"Wall time {(time.perf_counter() - t0) / 60:.1f} min. Rows without fd_digits_inf are evaluations "
              "from before it existed, possibly on another sample count."), ""]
    for name, rows in curves.items():
        best = min((r for r in rows if metric in r), key=lambda r: r[metric])
        lines += [f"## {name}: {describe(name)}", "",
                  (f"Best: {metric} {best[metric]:.2f} at {best['step']} updates "
                   f"({best[metric] / teacher_fd:.2f} x teacher)."), "",
                  "| updates | fd_digits_inf | fd_digits | precision | recall | class entropy |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {_fmt(r.get('fd_digits_inf'))} | {r['fd_digits']:.2f} | "
                  f"{r['precision']:.3f} | {r['recall']:.3f} | {r['class_entropy']:.3f} |" for r in rows]
        lines.append("")
    with open(os.path.join(workdir, "curve.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(workdir, "curve.json"), "w") as f:
        json.dump({"teacher": teacher, "curves": curves, "metric": metric, "goal": GOAL * teacher_fd}, f, indent=2,
                  default=float)
    plot(os.path.join(workdir, "curve.png"), curves, teacher_fd, metric)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main)
