"""Few-step students: DMD2 backward simulation (arXiv 2405.14867; pooled or step-aware critic) and
TDM (arXiv 2503.06674) with K in {1, 2, 4} sampling steps, one row per (method, K), with NFE and
measured samples/s, at equal generator updates or at equal wall time.

    python -m experiments.tables.fewstep --workdir runs/fewstep_gmm [--data gmm] [--steps 1,2,4] \
        [--methods dmd2_multistep,dmd2_stepaware,tdm] [--seeds 1] [--num_steps 2000] [--divergence js] \
        [--budget updates|wall] [--set distill.gen_index_min=150,distill.lambda_gan=0.01]
    python -m experiments.tables.fewstep --data digits --teacher runs/digits_score --workdir runs/fewstep_digits

Methods: `dmd2_multistep` (one fake score and discriminator for the outputs of every step),
`dmd2_stepaware` (the same with `distill.step_aware_critic=True`: the critic is conditioned on the
step that produced a sample) and `tdm`. `--budget=updates` trains every row for `--num_steps`
generator updates. `--budget=wall` gives every row the wall time that the method's K = 1 row needs
for `--num_steps` updates: each row's training rate (updates/s) is measured first, back to back in
this process (`calibrate`, the best of three timing windows), and a row with rate r_K trains
round(num_steps * r_K / r_1) updates (recorded in table.json and the table). `--set` changes config
fields of every row (comma-separated `section.field=value`, typed as the field; recorded in table.json). The per-step column
(`max step TV`) is the largest mode-weight TV over the outputs of single steps k = 0..K-1 of the
rollout (`experiments.diagnostics.fewstep_step_modes`; GMM only): it is low only when every step's
output matches the data, not merely the mixture over steps.

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

import numpy as np
from absl import app, flags

from experiments.tables.common import check_choices, final_samples, small_mode_mass, summarise, train_row
from fdistill import objectives
from fdistill.configs import CONFIG_DIR, load, override, parse_assignments

# method -> (config suffix <data>_<suffix>.py, distill overrides)
METHODS = {
    "dmd2_multistep": ("dmd2_multistep", {"step_aware_critic": False}),
    "dmd2_stepaware": ("dmd2_multistep", {"step_aware_critic": True}),
    "tdm": ("tdm", {}),
}
BUDGETS = ("updates", "wall")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per method, K and seed).")
_DATA = flags.DEFINE_string("data", "gmm", "Config prefix: <data>_dmd2_multistep.py and <data>_tdm.py.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods; allowed: {list(METHODS)}.")
_BUDGET = flags.DEFINE_enum("budget", "updates", BUDGETS, "Equal generator updates, or equal wall time (see above).")
_STEPS = flags.DEFINE_list("steps", ["1", "2", "4"], "Student step counts K.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Training seeds per row (train.seed = 0..N-1).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Generator updates per run (default: the config's).")
_DIVERGENCE = flags.DEFINE_string("divergence", None, "distill.divergence override (default: each config's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "train.batch_size override (default: the config's).")
_TEACHER = flags.DEFINE_string("teacher", None, "distill.teacher override: the workdir of a finished score run "
                               "(digits; default: the config's runs/digits_score).")
_SET = flags.DEFINE_list("set", [], "Config fields of every row, comma-separated section.field=value "
                         "(e.g. distill.gen_index_min=150,distill.gen_lr_schedule=cosine).")
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
    ("max_step_tv", "max step TV", "{:.3f}"),
    ("train_updates", "updates", "{:.0f}"),
    ("fd_digits", "fd_digits", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("class_entropy", "class entropy", "{:.3f}"),
]


def config_path(data: str, method: str) -> str:
    path = os.path.join(CONFIG_DIR, f"{data}_{METHODS[method][0]}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data={data!r} --methods={method!r}: no config {path}")
    return path


def run_config(data: str, method: str, K: int, seed: int, num_steps: int | None, batch_size: int | None,
               divergence: str | None = None, teacher: str | None = None, assignments: list[str] = ()):
    c = load(config_path(data, method))
    override(c, parse_assignments(c, assignments))
    c.distill.num_student_steps = K
    for k, v in METHODS[method][1].items():
        c.distill[k] = v
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


def calibrate(config, seconds: float = 6.0) -> float:
    """Generator updates per second of `config`'s compiled train step on this machine (one device
    per process as in the runs; the best of three windows, the least disturbed by other jobs)."""
    import jax

    obj = objectives.build(config)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    batch = jax.tree.map(jax.numpy.asarray, obj.batch(0))
    step = jax.jit(obj.train_step, donate_argnums=(0,))
    state, _ = step(state, frozen, batch)
    jax.block_until_ready(state)
    rates = []
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            state, _ = step(state, frozen, batch)
            n += 1
        jax.block_until_ready(state)
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def max_step_tv(objective, workdir: str, n: int) -> float:
    """The largest mode-weight TV over the outputs of single rollout steps k = 0..K-1."""
    from experiments.diagnostics.fewstep_step_modes import step_weights

    true = np.asarray(objective.source.gmm.weights, np.float64)
    tvs = [0.5 * float(np.abs(step_weights(final_samples(objective, workdir, n, step=k), objective.source.gmm)
                              - true).sum()) for k in range(objective.student.num_steps)]
    return max(tvs)


def write_markdown(path: str, table: dict, teacher: dict, meta: dict) -> None:
    cols = [col for col in COLUMNS if any(col[0] in s for s in table.values())]
    lines = [
        f"# Few-step students on {meta['data']}: DMD2 backward simulation and TDM",
        "",
        f"{meta['seeds']} seed(s) per row, batch {meta['batch_size']}, "
        + ("equal generator updates. " if meta["budget"] == "updates" else
           "equal wall time (each method's K = 1 budget; updates per row in the 'updates' column). ") +
        f"Mean +- std over seeds. samples/s: the K-step sampler, jitted, on this machine "
        f"({meta['backend']}). Wall time {meta['wall_seconds'] / 60:.1f} min."
        + (f" Every row with {', '.join(meta['set'])}." if meta.get("set") else ""),
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

    check_choices("methods", _METHODS.value, METHODS)
    for m in _METHODS.value:
        config_path(_DATA.value, m)
        run_config(_DATA.value, m, 1, 0, None, None, assignments=_SET.value)  # a bad --set fails here
    steps = [int(k) for k in _STEPS.value]
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    table, per_run, samples, teacher = {}, {}, {}, {}
    meta = {"data": _DATA.value, "seeds": _SEEDS.value, "steps": steps, "backend": jax.default_backend(),
            "budget": _BUDGET.value, "set": _SET.value, "divergence": {}, "sigmas": {}, "updates_per_sec": {}, "updates": {}}
    for method in _METHODS.value:
        updates = {K: _NUM_STEPS.value for K in steps}
        if _BUDGET.value == "wall":
            rates = {K: calibrate(run_config(_DATA.value, method, K, 0, None, _BATCH.value, _DIVERGENCE.value,
                                             _TEACHER.value, _SET.value)) for K in sorted(set(steps) | {1})}
            base = int(_NUM_STEPS.value or run_config(_DATA.value, method, 1, 0, None, None,
                                                      assignments=_SET.value).train.num_steps)
            updates = {K: max(1, round(base * rates[K] / rates[1])) for K in steps}
            meta["updates_per_sec"][method] = rates
            print(f"[fewstep] {method}: updates/s {rates} -> equal-wall-time updates {updates}", flush=True)
        for K in steps:
            row = f"{method} K={K}"
            rows = []
            for seed in range(_SEEDS.value):
                c = run_config(_DATA.value, method, K, seed, updates[K], _BATCH.value, _DIVERGENCE.value,
                               _TEACHER.value, _SET.value)
                sub = os.path.join(workdir, method, f"K{K}", f"seed_{seed}")
                print(f"[fewstep] {row} seed {seed} -> {sub}", flush=True)
                results = train_row(c, sub, f"{row} seed {seed}")
                results["train_updates"] = int(c.train.num_steps)
                objective = objectives.build(c)
                x = final_samples(objective, sub, int(c.eval.num_samples))
                if hasattr(objective.source, "gmm"):
                    results["small_mode_mass"] = small_mode_mass(objective, x)
                    results["max_step_tv"] = max_step_tv(objective, sub, int(c.eval.num_samples))
                if seed == 0:
                    samples[row] = objective.source.plot_samples(
                        x, os.path.join(workdir, f"samples_{method}_K{K}.png"), f"{row} ({c.distill.divergence})")
                rows.append(results)
                teacher = {k: v for k, v in results.items() if k.startswith("teacher/")}
                meta["divergence"][row] = c.distill.divergence + (" + GAN" if c.distill.lambda_gan > 0 else "")
                meta["sigmas"][row] = ", ".join(f"{s:.3g}" for s in objective.student.sigmas)
                meta["updates"][row] = int(c.train.num_steps)
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
