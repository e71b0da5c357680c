"""Few-step students: DMD2 backward simulation (arXiv 2405.14867) and TDM (arXiv 2503.06674) with
K in {1, 2, 4} sampling steps, one row per (method, K), with NFE and measured samples/s.

    python -m experiments.tables.fewstep --workdir runs/fewstep_gmm [--data gmm] [--steps 1,2,4] \
        [--methods dmd2_multistep,tdm] [--seeds 1] [--num_steps 2000] [--divergence js]
    python -m experiments.tables.fewstep --data digits --teacher runs/digits_score --workdir runs/fewstep_digits

Each (method, K, seed) trains through `fdistill.train.train_and_evaluate` in
`WORKDIR/<method>/K<k>/seed_<s>` (re-running resumes or reuses finished runs; SIGTERM or Ctrl-C stops
the table after the run in progress saved a checkpoint, exit status 143 / 130) from
`ml_collections_configs/<data>_dmd2_multistep.py` / `<data>_tdm.py` with `distill.num_student_steps`
= K. Writes `WORKDIR/table.md` and `WORKDIR/table.json` (per row: mean and std over seeds of every
metric, and the per-seed values) whose row names (`dmd2_multistep K=4`, ...) and columns follow
the one-step tables (`experiments/tables/fdistill_gmm.py`), so the rows can be read alongside or
appended to them; and `WORKDIR/samples_<method>_K<k>.png` (seed 0). The numbers are whatever came out.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments.tables.common import final_samples, small_mode_mass, summarise, train_row
from fdistill import objectives
from fdistill.configs import CONFIG_DIR, load

METHODS = ("dmd2_multistep", "tdm")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per method, K and seed).")
_DATA = flags.DEFINE_string("data", "gmm", "Config prefix: <data>_dmd2_multistep.py and <data>_tdm.py.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods; allowed: {list(METHODS)}.")
_STEPS = flags.DEFINE_list("steps", ["1", "2", "4"], "Student step counts K.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Training seeds per row (train.seed = 0..N-1).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Generator updates per run (default: the config's).")
_DIVERGENCE = flags.DEFINE_string("divergence", None, "distill.divergence override (default: each config's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "train.batch_size override (default: the config's).")
_TEACHER = flags.DEFINE_string("teacher", None, "distill.teacher override: the workdir of a finished score run "
                               "(digits; default: the config's runs/digits_score).")
flags.mark_flags_as_required(["workdir"])

# (metric key, header, format); metrics missing for a data source print '-'.
COLUMNS = [
    ("nfe", "NFE", "{:.0f}"),
    ("samples_per_sec", "samples/s", "{:.3g}"),
    ("speedup", "speedup vs teacher", "{:.2f}"),
    ("mode_coverage", "mode coverage", "{:.3f}"),
    ("mode_weight_tv", "mode-weight TV", "{:.3f}"),
    ("high_quality_frac", "high-quality frac", "{:.3f}"),
    ("mmd", "MMD", "{:.4f}"),
    ("small_mode_mass", "mass on 2 smallest modes / true", "{:.2f}"),
    ("fd_digits", "fd_digits", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("class_entropy", "class entropy", "{:.3f}"),
]


def config_path(data: str, method: str) -> str:
    path = os.path.join(CONFIG_DIR, f"{data}_{method}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data={data!r} --methods={method!r}: no config {path}")
    return path


def run_config(data: str, method: str, K: int, seed: int, num_steps: int | None, batch_size: int | None,
               divergence: str | None = None, teacher: str | None = None):
    c = load(config_path(data, method))
    c.distill.num_student_steps = K
    if divergence:
        c.distill.divergence = divergence
    if teacher:
        c.distill.teacher = os.path.abspath(teacher)
    c.train.seed = seed
    if num_steps:
        c.train.num_steps = num_steps
    if batch_size:
        c.train.batch_size = batch_size
    n = int(c.train.num_steps)
    c.train.checkpoint_every = n
    c.train.log_every = max(n // 10, 1)
    c.train.eval_every = 0
    return c


def write_markdown(path: str, table: dict, teacher: dict, meta: dict) -> None:
    cols = [col for col in COLUMNS if any(col[0] in s for s in table.values())]
    lines = [
        f"# Few-step students on {meta['data']}: DMD2 backward simulation and TDM",
        "",
        f"{meta['seeds']} seed(s) per row, {meta['num_steps']} generator updates, batch {meta['batch_size']}. "
        f"Mean +- std over seeds. samples/s: the K-step sampler, jitted, on this machine "
        f"({meta['backend']}). Wall time {meta['wall_seconds'] / 60:.1f} min.",
        "",
        "| row | divergence | student sigmas | " + " | ".join(h for _, h, _ in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for name, stats in table.items():
        cells = []
        for key, _, fmt in cols:
            if key in stats:
                m, s = stats[key]["mean"], stats[key]["std"]
                cells.append(fmt.format(m) + (" +- " + fmt.format(s) if meta["seeds"] > 1 else ""))
            else:
                cells.append("-")
        lines.append(f"| {name} | {meta['divergence'][name]} | {meta['sigmas'][name]} | " + " | ".join(cells) + " |")
    tcells = []
    for key, _, fmt in cols:
        v = teacher.get(f"teacher/{key}")
        tcells.append(fmt.format(v) if v is not None else "-")
    lines.append("| teacher (Heun) | - | - | " + " | ".join(tcells) + " |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    for m in _METHODS.value:
        if m not in METHODS:
            raise app.UsageError(f"--methods={m!r} is not allowed; allowed: {list(METHODS)}")
        config_path(_DATA.value, m)
    steps = [int(k) for k in _STEPS.value]
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    table, per_run, samples, teacher = {}, {}, {}, {}
    meta = {"data": _DATA.value, "seeds": _SEEDS.value, "steps": steps, "backend": jax.default_backend(),
            "divergence": {}, "sigmas": {}}
    for method in _METHODS.value:
        for K in steps:
            row = f"{method} K={K}"
            rows = []
            for seed in range(_SEEDS.value):
                c = run_config(_DATA.value, method, K, seed, _NUM_STEPS.value, _BATCH.value, _DIVERGENCE.value,
                               _TEACHER.value)
                sub = os.path.join(workdir, method, f"K{K}", f"seed_{seed}")
                print(f"[fewstep] {row} seed {seed} -> {sub}", flush=True)
                results = train_row(c, sub, f"{row} seed {seed}")
                objective = objectives.build(c)
                x = final_samples(objective, sub, int(c.eval.num_samples))
                if hasattr(objective.source, "gmm"):
                    results["small_mode_mass"] = small_mode_mass(objective, x)
                if seed == 0:
                    samples[row] = objective.source.plot_samples(
                        x, os.path.join(workdir, f"samples_{method}_K{K}.png"), f"{row} ({c.distill.divergence})")
                rows.append(results)
                teacher = {k: v for k, v in results.items() if k.startswith("teacher/")}
                meta["divergence"][row] = c.distill.divergence + (" + GAN" if c.distill.lambda_gan > 0 else "")
                meta["sigmas"][row] = ", ".join(f"{s:.3g}" for s in objective.student.sigmas)
                meta.update(num_steps=int(c.train.num_steps), batch_size=int(c.train.batch_size))
            per_run[row] = rows
            table[row] = summarise(rows)
            print(f"[fewstep] {row}: " + ", ".join(
                f"{k}={table[row][k]['mean']:.4g}" for k, *_ in COLUMNS if k in table[row]), flush=True)
    meta["wall_seconds"] = time.perf_counter() - t0
    out = {"meta": meta, "teacher": teacher, "rows": table, "per_seed": per_run}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True, default=float)
    write_markdown(os.path.join(workdir, "table.md"), table, teacher, meta)
    print(open(os.path.join(workdir, "table.md")).read(), flush=True)
    print(f"[fewstep] wrote {workdir}/table.md, table.json in {meta['wall_seconds'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    app.run(main)
