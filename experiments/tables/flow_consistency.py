"""Flow matching, BOSS, knowledge distillation and consistency models on the mixture or on digits, at NFE 1..8.

    python -m experiments.tables.flow_consistency --workdir runs/flow_consistency [--seeds 3] \
        [--methods flow,boss,kd,cd,ct,meanflow,scm,scm_paper,ect] [--boss_steps 2,4,8] [--cm_steps 20000]
    python -m experiments.tables.flow_consistency --data digits --teacher runs/digits_score \
        --workdir runs/flow_consistency_digits [--methods flow,boss,kd,cd,ect,scm,meanflow]

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

With `--data digits` the runs are the `digits_*` configs (1 seed by default): `flow` is `digits_flow.py`,
`boss` straightens it (`digits_boss.py`), and `kd`, `cd`, `ect` (`digits_ct.py`: consistency tuning from
the teacher's weights) and `scm` distill the digits score teacher `--teacher` (default: the configs'
runs/digits_score); `meanflow` learns from the data alone. `ct` from scratch and `scm_paper` are
mixture-only. The columns are fd_digits, precision, recall and class entropy.

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

from experiments.tables.common import check_choices, plot_image_rows, plot_panels, run_config, summarise, train_seeds
from fdistill import checkpoint, configs, objectives, placement
from fdistill.flow import uniform_times

METHODS = ("flow", "boss", "kd", "cd", "ct", "meanflow", "scm", "scm_paper", "ect")
DIGITS_METHODS = ("flow", "boss", "kd", "cd", "ect", "scm", "meanflow")
# consistency runs: method -> (config, overrides); 1, 2 and 4 steps of one network, `--cm_steps` updates
CM_RUNS = {"cd": ("gmm_cd", {}), "ct": ("gmm_ct", {}), "scm": ("gmm_scm", {}),
           "scm_paper": ("gmm_scm", {"distill.scm_tangent_norm": True, "distill.scm_adaptive_weight": True}),
           "ect": ("gmm_ct", {"distill.cm_schedule": "ect"})}
ROW_NAMES = {"cd": "CD", "ct": "CT", "meanflow": "MeanFlow", "scm": "sCD (TrigFlow)",
             "scm_paper": "sCD, paper's tangent normalisation + adaptive weight",
             "ect": "CT, ECT's continuous schedule"}
# digits consistency runs, as CM_RUNS (the teacher's U-Net, started from its weights)
DIGITS_CM_RUNS = {"cd": ("digits_cd", {}), "ect": ("digits_ct", {}), "scm": ("digits_scm", {})}
DIGITS_ROW_NAMES = {"ect": "ECT (CT from the teacher's weights)"}
COLUMNS = {
    "gmm": [("nfe", "NFE", "{:.0f}"), ("mode_coverage", "coverage", "{:.3f}"),
            ("mode_weight_tv", "mode-weight TV", "{:.3f}"), ("high_quality_frac", "high-quality frac", "{:.3f}"),
            ("mmd", "MMD", "{:.4f}")],
    "digits": [("nfe", "NFE", "{:.0f}"), ("fd_digits", "fd_digits", "{:.2f}"), ("precision", "precision", "{:.3f}"),
               ("recall", "recall", "{:.3f}"), ("class_entropy", "class entropy", "{:.3f}")],
}

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per run and seed).")
_DATA = flags.DEFINE_enum("data", "gmm", ["gmm", "digits"], "The imbalanced 8-mode ring or 8x8 digits.")
_TEACHER = flags.DEFINE_string("teacher", None, "digits: workdir of the finished digits score teacher of kd, cd, ect "
                               "and scm (default: the configs' runs/digits_score).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Training seeds per run (train.seed = 0..N-1; default 3 on gmm, "
                              "1 on digits).")
_METHODS = flags.DEFINE_list("methods", None, f"Runs to train (default: all); allowed: {list(METHODS)} on gmm, "
                             f"{list(DIGITS_METHODS)} on digits (boss needs flow).")
_BOSS_STEPS = flags.DEFINE_list("boss_steps", ["2", "4", "8"], "Euler step budgets N of the BOSS runs.")
_CM_STEPS = flags.DEFINE_integer("cm_steps", None, "Updates of the consistency runs (default: their configs').")
flags.mark_flags_as_required(["workdir"])


def mixture():
    return configs.load("gmm_fdistill").data


def config_for(name: str, seed: int, num_steps: int | None = None, **overrides):
    """A table run of config `name` (gmm_* on the main job's mixture, or digits_*). Digits
    distillation runs get `--teacher` unless `overrides` names their teacher."""
    base = configs.load(name)
    if name.startswith("gmm_"):
        base.data = mixture()
    elif _TEACHER.value and "distill" in base and "distill.teacher" not in overrides:
        overrides = {**overrides, "distill.teacher": os.path.abspath(_TEACHER.value)}
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
        name = DIGITS_ROW_NAMES.get(method, ROW_NAMES[method]) if _DATA.value == "digits" else ROW_NAMES[method]
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
    digits = meta["data"] == "digits"
    columns = COLUMNS[meta["data"]]
    lines = ["# Flow matching, BOSS, KD, consistency models and MeanFlow on "
             + ("8x8 digits" if digits else "the imbalanced 8-mode ring"), "",
             f"{meta['seeds']} seed(s) per row" + ("" if meta["seeds"] == 1 else "; mean +- std over seeds")
             + f". Consistency runs: {meta['cm_steps']} updates. Wall time {meta['wall_seconds'] / 60:.1f} min.", "",
             "| row | " + " | ".join(h for _, h, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for row, stats in table.items():
        spread = {k: "" if k == "nfe" or meta["seeds"] == 1 else " +- " + fmt.format(stats[k]["std"])
                  for k, _, fmt in columns if k in stats}
        cells = [fmt.format(stats[k]["mean"]) + spread[k] if k in stats else "-" for k, _, fmt in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    tcells = [fmt.format(teacher[f"teacher/{k}"]) if f"teacher/{k}" in teacher else "-" for k, _, fmt in columns]
    reference = "score teacher, EDM Heun (KD/CD/ECT/sCD reference)" if digits else \
        "analytic teacher, EDM Heun (KD/CD/CT/sCD reference)"
    lines.append(f"| {reference} | " + " | ".join(tcells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data = _DATA.value
    allowed = DIGITS_METHODS if data == "digits" else METHODS
    methods = _METHODS.value or list(allowed)
    check_choices("methods", methods, allowed)
    if "boss" in methods and "flow" not in methods:
        raise app.UsageError("--methods: boss straightens the flow teacher; include flow")
    if _TEACHER.value and (data != "digits" or not os.path.exists(os.path.join(_TEACHER.value, "config.json"))):
        raise app.UsageError(f"--teacher={_TEACHER.value!r}: only for --data digits, and it must be a finished "
                             "digits score run's workdir (with config.json)")
    seeds = _SEEDS.value or (1 if data == "digits" else 3)
    cm_runs = DIGITS_CM_RUNS if data == "digits" else CM_RUNS
    boss_steps = [int(n) for n in _BOSS_STEPS.value]
    logging.set_verbosity(logging.WARNING)
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    rows, teacher = {}, {}

    def run(method, row_dir, make_config, label=""):
        per_seed = train_seeds("flow_consistency", row_dir, workdir, seeds, make_config)
        if method == "kd" or method in cm_runs:
            teacher.update({k: v for k, v in per_seed[0].items() if k.startswith("teacher/")})
        rows.update(rows_of(method, per_seed, label))

    if "flow" in methods:
        # digits: the students' 4096 evaluation samples (digits_flow.py keeps digits_score.py's 2048); fd depends on it
        flow_eval = {"eval.num_samples": 4096} if data == "digits" else {}
        run("flow", "flow", lambda s: config_for(f"{data}_flow", s, **flow_eval))
    for n in boss_steps if "boss" in methods else []:
        run("boss", f"boss_{n}", lambda s, n=n: config_for(
            f"{data}_boss", s, **{"distill.num_student_steps": n,
                                  "distill.teacher": os.path.join(workdir, "flow", f"seed_{s}")}), str(n))
    if "kd" in methods:
        run("kd", "kd", lambda s: config_for(f"{data}_kd", s))
    for m, (name, overrides) in cm_runs.items():
        if m in methods:
            run(m, m, lambda s, name=name, overrides=overrides: config_for(name, s, _CM_STEPS.value, **overrides))
    if "meanflow" in methods:
        run("meanflow", "meanflow", lambda s: config_for(f"{data}_meanflow", s))
    table = {row: summarise(per_seed) for row, per_seed in rows.items()}
    meta = {"data": data, "seeds": seeds, "cm_steps": _CM_STEPS.value or configs.load(f"{data}_cd").train.num_steps,
            "wall_seconds": time.perf_counter() - t0}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump({"meta": meta, "teacher": teacher, "rows": table, "per_seed": rows}, f, indent=2, sort_keys=True,
                  default=float)
    write_markdown(os.path.join(workdir, "table.md"), table, teacher, meta)
    samples = {}
    for run in ["flow", "boss_4", "kd", "cd", "ct", "meanflow", "scm", "ect"]:
        if os.path.exists(os.path.join(workdir, run, "seed_0", "results.json")):
            samples.update(run_samples(os.path.join(workdir, run, "seed_0"), 4096 if data == "gmm" else 64))
    if samples and data == "digits":
        plot_image_rows([(name, x[:30]) for name, x in samples.items()], os.path.join(workdir, "samples.png"))
    elif samples:
        objective = objectives.build(config_for("gmm_kd", 0))  # the mixture's reference data and metrics
        hq = {k: f"hq {objective.source.evaluate_samples(x)['high_quality_frac']:.2f}" for k, x in samples.items()}
        plot_panels(os.path.join(workdir, "samples.png"), objective, samples, hq,
                    title="seed 0 samples (red) over the data (grey)")
    print(open(os.path.join(workdir, "table.md")).read(), flush=True)


if __name__ == "__main__":
    app.run(main)
