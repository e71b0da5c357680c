"""Flow matching, BOSS, knowledge distillation and consistency models on the mixture, at NFE 1..8.

    python -m experiments.tables.flow_consistency --workdir runs/flow_consistency [--seeds 3] \
        [--methods flow,boss,kd,cd,ct,meanflow,scm,scm_paper,ect] [--boss_steps 2,4,8] [--cm_steps 20000]

Every run is on the main job's imbalanced 8-mode ring (`gmm_fdistill.py`'s `config.data`), seeds
0..N-1, in `WORKDIR/<run>/seed_<s>` (re-running reuses finished runs and resumes stopped ones):

* `flow`: the flow-matching teacher (`gmm_flow.py`); its own 18-step Heun in t (NFE 35) is a row.
* `boss`: `gmm_boss.py` with N = 2, 4, 8 Euler steps on that seed's flow teacher. Each run gives three
  rows: the teacher with N uniform steps, the teacher on the BOSS schedule, and BOSS + refinement.
* `kd`: `gmm_kd.py` (analytic teacher, NFE 1). `cd`, `ct`: `gmm_cd.py` / `gmm_ct.py`, evaluated with
  1, 2 and 4 steps of the same network (`--cm_steps` updates).
* `meanflow`: `gmm_meanflow.py` (from data alone), 1, 2 and 4 steps of the same network.
* `scm`: `gmm_scm.py` (continuous-time consistency distillation, sCD with TrigFlow, of the analytic
  teacher), 1, 2 and 4 steps of the same network (`--cm_steps` updates). `scm_paper`: the same with the
  paper's tangent normalisation and adaptive weight (which `gmm_scm.py` turns off; its docstring says why).
* `ect`: `gmm_ct.py` with ECT's continuous-time schedule (`distill.cm_schedule='ect'`), like `ct`.

Writes `WORKDIR/table.md`, `WORKDIR/table.json` (mean and std over seeds, per-seed values) and
`WORKDIR/samples.png` (seed 0 of every method present, at its most telling step counts).
f-distill, DMD2 and TDM on the same mixture are in `experiments/results/fewstep_gmm_*.md`.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

import jax

from experiments.tables.common import check_choices, plot_panels, run_config, summarise, train_seeds
from fdistill import checkpoint, configs, objectives, placement
from fdistill.flow import uniform_times

METHODS = ("flow", "boss", "kd", "cd", "ct", "meanflow", "scm", "scm_paper", "ect")
# consistency runs: method -> (config, overrides); 1, 2 and 4 steps of one network, `--cm_steps` updates
CM_RUNS = {"cd": ("gmm_cd", {}), "ct": ("gmm_ct", {}), "scm": ("gmm_scm", {}),
           "scm_paper": ("gmm_scm", {"distill.scm_tangent_norm": True, "distill.scm_adaptive_weight": True}),
           "ect": ("gmm_ct", {"distill.cm_schedule": "ect"})}
ROW_NAMES = {"cd": "CD", "ct": "CT", "meanflow": "MeanFlow", "scm": "sCD (TrigFlow)",
             "scm_paper": "sCD, paper's tangent normalisation + adaptive weight",
             "ect": "CT, ECT's continuous schedule"}
COLUMNS = [("nfe", "NFE", "{:.0f}"), ("mode_coverage", "coverage", "{:.3f}"), ("mode_weight_tv", "mode-weight TV", "{:.3f}"),
           ("high_quality_frac", "high-quality frac", "{:.3f}"), ("mmd", "MMD", "{:.4f}")]

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per run and seed).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds per run (train.seed = 0..N-1).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Runs to train; allowed: {list(METHODS)} (boss needs flow).")
_BOSS_STEPS = flags.DEFINE_list("boss_steps", ["2", "4", "8"], "Euler step budgets N of the BOSS runs.")
_CM_STEPS = flags.DEFINE_integer("cm_steps", None, "Updates of the consistency runs (default: their configs').")
flags.mark_flags_as_required(["workdir"])


def mixture():
    return configs.load("gmm_fdistill").data


def config_for(name: str, seed: int, num_steps: int | None = None, **overrides):
    base = configs.load(name)
    base.data = mixture()
    return run_config(base, seed, int(num_steps or base.train.num_steps), overrides)


def rows_of(method: str, per_seed: list[dict], label: str) -> dict[str, list[dict]]:
    """Table rows (name -> per-seed metric dicts) of one run's results."""
    def pick(prefix):
        return [{k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
                for r in per_seed]

    if method == "boss":
        n = label
        return {f"flow teacher, {n} uniform Euler steps": pick("uniform/"),
                f"flow teacher, BOSS schedule ({n} steps)": pick("schedule/"),
                f"BOSS + refinement ({n} steps)": pick("")}
    if method in ROW_NAMES:
        name = ROW_NAMES[method]
        return {f"{name}, {k} step{'s' if k > 1 else ''}": pick("" if k == 1 else f"steps{k}/") for k in (1, 2, 4)}
    if method == "flow":
        return {"flow teacher, 18 Heun steps in t": pick("")}
    return {"KD (Luhman & Luhman), 1 step": pick("")}


def run_samples(workdir: str, n: int) -> dict:
    """name -> samples of the finished run in `workdir` (seed 0), with its evaluation's key."""
    config = configs.load_json(os.path.join(workdir, "config.json"))
    obj = objectives.build(config)
    tree = jax.tree.map(jax.numpy.asarray, checkpoint.restore_tree(workdir))
    params = tree["ema_params"] or tree["params"]
    key = jax.random.PRNGKey(0)
    if config.objective == "flow":
        return {"flow teacher (35 NFE)": obj.sample(params, key, n)}
    if config.objective == "meanflow":
        return {f"MeanFlow, {k} step{'s' * (k > 1)}": obj.sample(params, key, n, k) for k in (1, 4)}
    if config.objective == "kd":
        return {"KD, 1 step": obj.evaluator.samples(params, key, n)[0]}
    if config.objective in ("cd", "ct", "scm"):
        net = params["net"] if config.objective == "scm" else params
        name = {"scm": "sCD", "ct": "ECT" if config.distill.cm_schedule == "ect" else "CT"}.get(config.objective, "CD")
        return {f"{name}, {k} step{'s' * (k > 1)}": obj.evaluators[k].samples(net, key, n)[0] for k in (1, 4)}
    steps = obj.num_steps  # boss
    teacher = placement.frozen_on_host(obj.frozen())["teacher"]
    return {f"{steps} uniform Euler steps": obj.evaluator.samples({"net": teacher, "times": uniform_times(steps)},
                                                                key, n)[0],
            f"BOSS + refinement, {steps} steps": obj.evaluator.samples(
                {"net": params, "times": tree["extra"]["times"]}, key, n)[0]}


def write_markdown(path: str, table: dict, teacher: dict, meta: dict) -> None:
    lines = ["# Flow matching, BOSS, KD, consistency models and MeanFlow on the imbalanced 8-mode ring", "",
             f"{meta['seeds']} seed(s) per row; mean +- std over seeds. CD/CT/sCD: {meta['cm_steps']} updates. "
             f"Wall time {meta['wall_seconds'] / 60:.1f} min.", "",
             "| row | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row, stats in table.items():
        cells = [fmt.format(stats[k]["mean"]) + ("" if k == "nfe" else " +- " + fmt.format(stats[k]["std"]))
                 if k in stats else "-" for k, _, fmt in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    tcells = [fmt.format(teacher[f"teacher/{k}"]) if f"teacher/{k}" in teacher else "-" for k, _, fmt in COLUMNS]
    lines.append("| analytic teacher, EDM Heun (KD/CD/CT/sCD reference) | " + " | ".join(tcells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_choices("methods", _METHODS.value, METHODS)
    if "boss" in _METHODS.value and "flow" not in _METHODS.value:
        raise app.UsageError("--methods: boss straightens the flow teacher; include flow")
    boss_steps = [int(n) for n in _BOSS_STEPS.value]
    logging.set_verbosity(logging.WARNING)
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    rows, teacher = {}, {}

    def run(method, row_dir, make_config, label=""):
        per_seed = train_seeds("flow_consistency", row_dir, workdir, _SEEDS.value, make_config)
        if method == "kd" or method in CM_RUNS:
            teacher.update({k: v for k, v in per_seed[0].items() if k.startswith("teacher/")})
        rows.update(rows_of(method, per_seed, label))

    if "flow" in _METHODS.value:
        run("flow", "flow", lambda s: config_for("gmm_flow", s))
    for n in boss_steps if "boss" in _METHODS.value else []:
        run("boss", f"boss_{n}", lambda s, n=n: config_for(
            "gmm_boss", s, **{"distill.num_student_steps": n,
                              "distill.teacher": os.path.join(workdir, "flow", f"seed_{s}")}), str(n))
    if "kd" in _METHODS.value:
        run("kd", "kd", lambda s: config_for("gmm_kd", s))
    for m, (name, overrides) in CM_RUNS.items():
        if m in _METHODS.value:
            run(m, m, lambda s, name=name, overrides=overrides: config_for(name, s, _CM_STEPS.value, **overrides))
    if "meanflow" in _METHODS.value:
        run("meanflow", "meanflow", lambda s: config_for("gmm_meanflow", s))
    table = {row: summarise(per_seed) for row, per_seed in rows.items()}
    meta = {"seeds": _SEEDS.value, "cm_steps": _CM_STEPS.value or configs.load("gmm_cd").train.num_steps,
            "wall_seconds": time.perf_counter() - t0}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump({"meta": meta, "teacher": teacher, "rows": table, "per_seed": rows}, f, indent=2, sort_keys=True,
                  default=float)
    write_markdown(os.path.join(workdir, "table.md"), table, teacher, meta)
    samples = {}
    for run in ["flow", "boss_4", "kd", "cd", "ct", "meanflow", "scm", "ect"]:
        if os.path.exists(os.path.join(workdir, run, "seed_0", "results.json")):
            samples.update(run_samples(os.path.join(workdir, run, "seed_0"), 4096))
    if samples:
        objective = objectives.build(config_for("gmm_kd", 0))  # the mixture's reference data and metrics
        hq = {k: f"hq {objective.source.evaluate_samples(x)['high_quality_frac']:.2f}" for k, x in samples.items()}
        plot_panels(os.path.join(workdir, "samples.png"), objective, samples, hq,
                    title="seed 0 samples (red) over the data (grey)")
    print(open(os.path.join(workdir, "table.md")).read(), flush=True)


if __name__ == "__main__":
    app.run(main)
