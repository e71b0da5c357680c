"""Why is the one-step student a curve? Error sources of f-distill students on the analytic mixture,
one change at a time (issue "The main job's student is a curve"; results in
`experiments/results/student_quality.md`).

    python -m experiments.studies.student_quality --workdir runs/student_quality [--seeds 3] \
        [--num_steps 5000] [--rows oracle_old,oracle,old,new,...] [--config.data.num_modes=10 ...]

Every row is the main job's config (`ml_collections_configs/gmm_fdistill.py`) with the overrides in
ROWS: `new` is its defaults before the categorical generator (`configs.STUDENT_CONTINUOUS`), the rows
after it change one thing of `new`, and `categories` is today's defaults. Each row trains for
`--num_steps` generator updates (cosine schedules then decay over that length) with seeds 0..N-1 through
`fdistill.train.train_and_evaluate` in `WORKDIR/<row>/seed_<s>` (re-running resumes or reuses
finished runs; SIGTERM or Ctrl-C stops the study after the run in progress saved a checkpoint).
The oracle rows come first: their critic is exact (`distill.critic='oracle'`: the noised kernel
density of fresh student samples for the fake score and the exact log density ratio for the
discriminator), so they measure what the generator and objective reach without critic error.

Writes `WORKDIR/table.md`, `WORKDIR/table.json` (mean and std over seeds of every metric, per-seed
values) and `WORKDIR/samples.png` (seed 0 of the `--figure_rows`). Study-only options of the
original exploration (another generator network, input normalisation, several noise draws per
sample) were not kept in the package and are not rows here.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.tables.common import final_samples, plot_panels, run_config, summarise, train_seeds
from fdistill import objectives
from fdistill.configs import CONFIG_DIR, STUDENT_BEFORE_STUDY, STUDENT_CONTINUOUS

OLD = STUDENT_BEFORE_STUDY  # the main job before this study (its train.* length is the study's --num_steps)
NEW = STUDENT_CONTINUOUS  # the main job after the study, before the categorical generator

# row -> (what it changes, overrides of gmm_fdistill.py). Order = table order.
ROWS = {
    "oracle_old": ("oracle critic, objective and generator before the study", {**OLD, "distill.critic": "oracle"}),
    "oracle": ("oracle critic, the study's defaults (continuous z)", {**NEW, "distill.critic": "oracle"}),
    "old": ("defaults before the study (lambda_gan 1e-3, indices 20..980, 2-D z, constant lr)", OLD),
    "new": ("the study's defaults (lambda_gan 1e-2, indices 150..350, continuous 8-D z, cosine lr)", NEW),
    "gan0": ("new, lambda_gan = 0", {**NEW, "distill.lambda_gan": 0.0}),
    "gan1e-3": ("new, lambda_gan = 1e-3", {**NEW, "distill.lambda_gan": 1e-3}),
    "gan1e-1": ("new, lambda_gan = 1e-1", {**NEW, "distill.lambda_gan": 1e-1}),
    "index_wide": ("new, distillation indices 20..980", {**NEW, "distill.gen_index_min": 20, "distill.gen_index_max": 980}),
    "latent2": ("new, z of the data's dimension (2)", {**NEW, "distill.latent_dim": 0}),
    "constant_lr": ("new, constant generator learning rate", {**NEW, "distill.gen_lr_schedule": "constant"}),
    "no_dmd_weight": ("new, no DMD weight 1/mean|x - D_real|", {**NEW, "distill.teacher_error_norm": False}),
    "no_ratio_norm": ("new, no per-bin ratio normalisation", {**NEW, "distill.ratio_bins": 0}),
    "width128": ("new, MLP width 128 (generator and critic)", {**NEW, "model.width": 128}),
    "critic1": ("new, 1 critic update per generator update", {**NEW, "distill.fake_updates_per_gen": 1}),
    "lr_gen2e-3": ("new, generator learning rate 2e-3", {**NEW, "distill.lr_gen": 2e-3}),
    "categories": ("today's defaults: 256 latent categories, z x 0.1, indices 150..500 -> 350", {}),
}
FIGURE_ROWS = ["oracle_old", "oracle", "old", "new"]
COLUMNS = [("mode_coverage", "coverage", "{:.3f}"), ("mode_weight_tv", "mode-weight TV", "{:.3f}"),
           ("high_quality_frac", "high-quality frac", "{:.3f}"), ("mmd", "MMD", "{:.4f}")]

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(CONFIG_DIR, "gmm_fdistill.py"), "Base config (gmm_fdistill.py).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per row and seed).")
_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows to train; allowed: {list(ROWS)}.")
_FIGURE_ROWS = flags.DEFINE_list("figure_rows", FIGURE_ROWS, "Rows drawn in samples.png (seed 0).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds per row (train.seed = 0..N-1).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Generator updates per run (default: the config's).")
flags.mark_flags_as_required(["workdir"])


def row_config(base, row: str, seed: int, num_steps: int):
    """The base config with the row's overrides, the seed and the study's length."""
    return run_config(base, seed, num_steps, ROWS[row][1])


def write_markdown(path: str, table: dict, teacher: dict, meta: dict) -> None:
    d = meta["data"]
    lines = [f"# One-step f-distill students on a {d['layout']} mixture of {d['num_modes']} modes "
             f"(imbalance {d['imbalance']:g}), one change per row",
             "",
             f"{meta['seeds']} seed(s) per row, {meta['num_steps']} generator updates, divergence "
             f"{meta['divergence']}. Mean +- std over seeds. Wall time {meta['wall_seconds'] / 60:.1f} min.",
             "",
             "| row | change | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for row, stats in table.items():
        cells = [fmt.format(stats[k]["mean"]) + " +- " + fmt.format(stats[k]["std"]) if k in stats else "-"
                 for k, _, fmt in COLUMNS]
        lines.append(f"| {row} | {ROWS[row][0]} | " + " | ".join(cells) + " |")
    tcells = [fmt.format(teacher[f"teacher/{k}"]) if f"teacher/{k}" in teacher else "-" for k, _, fmt in COLUMNS]
    lines.append(f"| teacher | exact, {int(teacher.get('teacher/nfe', 35))}-NFE Heun | " + " | ".join(tcells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [r for r in _ROWS.value + _FIGURE_ROWS.value if r not in ROWS]
    if unknown:
        raise app.UsageError(f"--rows/--figure_rows: unknown {unknown}; allowed: {list(ROWS)}")
    logging.set_verbosity(logging.WARNING)
    base = _CONFIG.value
    num_steps = int(_NUM_STEPS.value or base.train.num_steps)
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    table, per_run, samples, teacher = {}, {}, {}, {}
    for row in _ROWS.value:
        def keep(c, sub, seed, results):
            teacher.update({k: v for k, v in results.items() if k.startswith("teacher/")})
            if seed == 0 and row in _FIGURE_ROWS.value:
                samples[row] = final_samples(objectives.build(c), sub, int(c.eval.num_samples))

        results_per_seed = train_seeds("student_quality", row, workdir, _SEEDS.value,
                                       lambda seed: row_config(base, row, seed, num_steps), keep)
        per_run[row] = results_per_seed
        table[row] = summarise(results_per_seed)
        print(f"[student_quality] {row}: " + ", ".join(
            f"{k}={table[row][k]['mean']:.3f}" for k, *_ in COLUMNS if k in table[row]), flush=True)
    meta = {"data": {k: base.data[k] for k in ("layout", "num_modes", "imbalance")}, "seeds": _SEEDS.value,
            "num_steps": num_steps, "divergence": base.distill.divergence,
            "wall_seconds": time.perf_counter() - t0}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump({"meta": meta, "teacher": teacher, "rows": table, "per_seed": per_run}, f, indent=2,
                  sort_keys=True, default=float)
    write_markdown(os.path.join(workdir, "table.md"), table, teacher, meta)
    if samples:
        extra = {r: f"hq {table[r]['high_quality_frac']['mean']:.2f}" for r in samples}
        plot_panels(os.path.join(workdir, "samples.png"), objectives.build(row_config(base, "new", 0, num_steps)),
                    samples, extra)
    print(open(os.path.join(workdir, "table.md")).read(), flush=True)


if __name__ == "__main__":
    app.run(main)
