"""f-distill divergence table at toy scale (arXiv 2502.15681): one-step students of an imbalanced
Gaussian-mixture teacher, one row per f-divergence, averaged over seeds.

    python -m experiments.tables.fdistill_gmm --workdir runs/fdistill_table [--seeds 2] \
        [--divergences rkl,sf,neyman,js,sh,kl,jf,pearson] [--num_steps 2000] [--config.distill.lambda_gan=0]

Every (divergence, seed) trains through `fdistill.train.train_and_evaluate` in
`WORKDIR/<divergence>/seed_<s>` (re-running resumes or reuses finished runs; SIGTERM or Ctrl-C stops
the table after the run in progress saved a checkpoint, exit status 143 / 130), starting from
`ml_collections_configs/gmm_fdistill.py` with the overrides below. Writes `WORKDIR/table.md`,
`WORKDIR/table.json` (per divergence: mean and std of every metric over seeds, and the per-seed
values) and `WORKDIR/samples.png` (one scatter panel per divergence, seed 0, over teacher data).
The numbers are whatever came out; the table never edits them.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.tables.common import final_samples, plot_panels, run_config, small_mode_mass, summarise, train_seeds
from fdistill import divergences, objectives
from fdistill.configs import CONFIG_DIR

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(CONFIG_DIR, "gmm_fdistill.py"), "Base config (gmm_fdistill.py).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per divergence and seed).")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Number of training seeds per divergence (train.seed = 0..N-1).")
_DIVERGENCES = flags.DEFINE_list("divergences", ["rkl", "sf", "neyman", "js", "sh", "kl", "jf", "pearson"],
                                 f"Divergences to train; allowed: {divergences.names()}.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Generator updates per run (default: the config's train.num_steps).")
flags.mark_flags_as_required(["workdir"])

# Columns of table.md: (metric key, header, format, higher is better?)
COLUMNS = [
    ("mode_coverage", "mode coverage", "{:.3f}", True),
    ("mode_weight_tv", "mode-weight TV", "{:.3f}", False),
    ("high_quality_frac", "high-quality frac", "{:.3f}", True),
    ("mmd", "MMD", "{:.4f}", False),
    ("ratio_spearman", "ratio Spearman", "{:.3f}", True),
    ("speedup", "speedup vs 35-NFE", "{:.1f}", True),
]
SMALL_MODE_KEY = "small_mode_mass"


def divergence_config(base, divergence: str, seed: int, num_steps: int):
    return run_config(base, seed, num_steps, {"distill.divergence": divergence})


def write_markdown(path: str, table: dict, teacher: dict, meta: dict) -> None:
    cols = COLUMNS + [(SMALL_MODE_KEY, "mass on 2 smallest modes / true", "{:.2f}", True)]
    lines = [
        f"# f-distill on an imbalanced {meta['num_modes']}-mode ring (largest/smallest weight "
        f"{meta['imbalance']:g}), 1-NFE students",
        "",
        f"{meta['seeds']} seed(s) per divergence, {meta['num_steps']} generator updates, batch "
        f"{meta['batch_size']}, {meta['fake_updates_per_gen']} critic updates per generator update, "
        f"lambda_gan={meta['lambda_gan']:g}, MLP width {meta['width']}. Mean +- std over seeds. "
        f"Wall time {meta['wall_seconds'] / 60:.1f} min.",
        "",
        "| divergence | h(r) | " + " | ".join(h for _, h, _, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    h_text = {"rkl": "1", "kl": "r", "js": "r/(1+r)", "sh": "sqrt(r)", "jf": "1+r", "sf": "1/(1+r)",
              "pearson": "r^2", "neyman": "1/r", "alpha": f"r^{meta.get('alpha', 0.5)}"}
    for name, stats in table.items():
        cells = []
        for key, _, fmt, _ in cols:
            if key in stats:
                cells.append(fmt.format(stats[key]["mean"]) + " +- " + fmt.format(stats[key]["std"]))
            else:
                cells.append("-")
        lines.append(f"| {name} | {h_text.get(name, '?')} | " + " | ".join(cells) + " |")
    tcells = []
    for key, _, fmt, _ in cols:
        v = teacher.get(f"teacher/{key}", teacher.get(key))
        tcells.append(fmt.format(v) if v is not None else "-")
    lines.append(f"| teacher ({int(teacher.get('teacher/nfe', 35))}-NFE Heun) | exact | " + " | ".join(tcells) + " |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    base = _CONFIG.value
    num_steps = int(_NUM_STEPS.value or base.train.num_steps)
    for d in _DIVERGENCES.value:
        divergences.get(d, **({"alpha": base.distill.alpha} if d == "alpha" else {}))  # fail early
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    table, per_run, samples, teacher = {}, {}, {}, {}
    for d in _DIVERGENCES.value:
        def small_modes(c, sub, seed, results):
            objective = objectives.build(c)
            x = final_samples(objective, sub, int(c.eval.num_samples))
            results[SMALL_MODE_KEY] = small_mode_mass(objective, x)
            teacher.update({k: v for k, v in results.items() if k.startswith("teacher/")})
            if seed == 0:
                samples[d] = x

        rows = train_seeds("fdistill_gmm", d, workdir, _SEEDS.value,
                           lambda seed: divergence_config(base, d, seed, num_steps), small_modes)
        per_run[d] = rows
        table[d] = summarise(rows)
        print(f"[fdistill_gmm] {d}: " + ", ".join(
            f"{k}={table[d][k]['mean']:.3f}" for k, *_ in COLUMNS if k in table[d]), flush=True)
    wall = time.perf_counter() - t0
    # teacher's small-mode mass, for reference
    ref_obj = objectives.build(divergence_config(base, _DIVERGENCES.value[0], 0, num_steps))
    meta = {
        "num_modes": int(base.data.num_modes), "imbalance": float(base.data.imbalance),
        "seeds": _SEEDS.value, "num_steps": num_steps, "batch_size": int(base.train.batch_size),
        "fake_updates_per_gen": int(base.distill.fake_updates_per_gen), "lambda_gan": float(base.distill.lambda_gan),
        "width": int(base.model.width), "alpha": float(base.distill.alpha), "wall_seconds": wall,
    }
    teacher[f"teacher/{SMALL_MODE_KEY}"] = 1.0
    out = {"meta": meta, "teacher": teacher, "divergences": table, "per_seed": per_run}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True, default=float)
    write_markdown(os.path.join(workdir, "table.md"), table, teacher, meta)
    extra = {d: f"cov {table[d]['mode_coverage']['mean']:.2f}" for d in table}
    plot_panels(os.path.join(workdir, "samples.png"), ref_obj, samples, extra)
    print(open(os.path.join(workdir, "table.md")).read(), flush=True)
    print(f"[fdistill_gmm] wrote {workdir}/table.md, table.json, samples.png in {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    app.run(main)
