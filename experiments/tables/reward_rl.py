"""Table: reward optimisation of a diffusion sampler - FIND and DDPO beside Diffusion-DPO and MaPO.

    python -m experiments.tables.reward_rl --workdir runs/table_reward_rl                 # the ring, 3 seeds, ~20 min
    python -m experiments.tables.reward_rl --data=digits --workdir runs/table_reward_rl_digits   # 1 seed

1. Trains the reference score run (gmm_score.py or digits_score.py) into DIR/reference and, on the
   ring, a one-step f-distill student of the same balanced ring into DIR/student (reused when finished).
2. For each reward (ring: the half-plane r = n . x and the posterior mass of modes {0, 1}; digits:
   log p_clf(3 | x)) and seed, trains into DIR/<reward>/<row>/seed_<s>:
   * find_ode: FIND (arXiv 2407.19453) on the reference's 35-NFE Heun ODE sampler;
   * find_1step (ring): FIND on the one-step student (one network call per reward evaluation);
   * find_kl1 (digits): FIND with the ring's KL weight 1 instead of digits_find.py's 0.1 (the KL
     sums over the 64 noise pixels);
   * ddpo: DDPO_IS (arXiv 2305.13301) on the reference's ancestral sampler (20 levels; digits 10);
   * dpo, mapo: Diffusion-DPO and MaPO on Bradley-Terry pairs of the reference's samples (ring:
     beta 50 and 0.01, rows of experiments/tables/diffusion_preference.py; digits: their configs).
   Each row's length is its config's (`--rl_steps`, `--po_steps` change them).
3. Prints and writes DIR/table.md, DIR/table.json, DIR/reward_curves.png (training reward against
   reward evaluations and seconds, seed 0) and DIR/samples.png (seed 0's sample plots or grids).

Columns: reward (mean r of the evaluation samples; FIND: z from the trained distribution; DDPO: the
trained stochastic sampler), its reference's (the same sampler untrained, same noise), pref =
preferred fraction; ring: pref&data = preferred and within 3 mode stds of a mode, hq, modes kept (of
8); digits: fd_digits (and the reference's), precision, recall; MMD to the reference's samples,
KL(policy || N(0, I)) for FIND, and reward evaluations used (FIND, DDPO: steps x batch;
DPO/MaPO: the 2 x num_pairs labelled samples). Speed at equal alignment: the reward evaluations and
training seconds (same machine, same run) until the training batch's mean reward first exceeds the
sampler's own reference reward by G = 0.5 x (the smaller final gain of find_ode and ddpo), per seed.
`--quick` for a few-minute smoke run.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from experiments.tables.common import check_choices, run_config, summarise, time_to_level, train_row, training_curve
from fdistill import configs

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the reference, the student, the runs and the table.")
_DATA = flags.DEFINE_enum("data", "gmm", ["gmm", "digits"], "The 8-mode ring (3 seeds) or 8x8 digits (1 seed).")
_SEEDS = flags.DEFINE_integer("seeds", 0, "Seeds per row (0 = 3 on the ring, 1 on digits).")
_REWARDS = flags.DEFINE_list("rewards", None, "Rewards (config.reward.kind); default: the data's (see REWARDS).")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 0, "FIND and DDPO steps (0 = their configs' num_steps).")
_PO_STEPS = flags.DEFINE_integer("po_steps", 0, "Diffusion-DPO and MaPO steps (0 = their configs' num_steps).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 0, "Score-matching steps of the reference (0 = its config's).")
_STUDENT_STEPS = flags.DEFINE_integer("student_steps", 4000, "Generator updates of the one-step student (ring only).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: short reference, student and rows, one seed.")
flags.mark_flag_as_required("workdir")

REWARDS = {"half_plane": {}, "mode_subset": {"reward.modes": (0, 1)}, "classifier": {}}
DATA = {  # the reference's config, the rewards, and the rows: (row, label, config, overrides)
    "gmm": {"score": "gmm_score", "rewards": ["half_plane", "mode_subset"], "rows": [
        ("find_ode", "FIND, 35-NFE ODE", "gmm_find", {}),
        ("find_1step", "FIND, 1-step student", "gmm_find", {}),
        ("ddpo", "DDPO_IS, 20-step ancestral", "gmm_ddpo", {"train.learning_rate": 1e-5}),
        ("dpo", "Diffusion-DPO, beta 50", "gmm_diffusion_dpo", {"dpo.beta": 50.0, "train.learning_rate": 3e-4}),
        ("mapo", "MaPO, beta 0.01", "gmm_mapo", {"dpo.beta": 0.01, "train.learning_rate": 3e-4}),
    ]},
    "digits": {"score": "digits_score", "rewards": ["classifier"], "rows": [
        ("find_ode", "FIND, 35-NFE ODE, kl_weight 0.1", "digits_find", {}),
        ("find_kl1", "FIND, 35-NFE ODE, kl_weight 1", "digits_find", {"rl.kl_weight": 1.0}),
        ("ddpo", "DDPO_IS, 10-step ancestral", "digits_ddpo", {}),
        ("dpo", "Diffusion-DPO, beta 100", "digits_diffusion_dpo", {}),
        ("mapo", "MaPO, beta 0.01", "digits_mapo", {}),
    ]},
}
COLUMNS = [  # (header, results key, format); the sample metrics differ per data source
    ("reward", "reward_mean", "{:.3f}"),
    ("ref reward", "reference/reward_mean", "{:.3f}"),
    ("pref", "preferred_frac", "{:.3f}"),
]
SAMPLE_COLUMNS = {
    "gmm": [("pref&data", "preferred_on_data_frac", "{:.3f}"), ("hq", "sample/high_quality_frac", "{:.3f}"),
            ("modes", "sample/mode_coverage", "modes")],
    "digits": [("fd_digits", "sample/fd_digits", "{:.2f}"), ("ref fd", "reference/fd_digits", "{:.2f}"),
               ("precision", "sample/precision", "{:.3f}"), ("recall", "sample/recall", "{:.3f}")],
}
TAIL_COLUMNS = [
    ("MMD ref", "mmd_to_reference", "{:.4f}"),
    ("KL prior", "kl_to_prior", "{:.2f}"),
    ("reward evals", "reward_evals", "{:.0f}"),
]


def columns(data: str) -> list:
    return COLUMNS + SAMPLE_COLUMNS[data] + TAIL_COLUMNS


def _fmt(summary: dict, key: str, fmt: str) -> str:
    if key not in summary:
        return "-"
    m, s = summary[key]["mean"], summary[key]["std"]
    if fmt == "modes":
        return f"{8 * m:.1f}/8"
    return fmt.format(m) + (f" ± {fmt.format(s)}" if summary[key]["n"] > 1 and fmt != "{:.0f}" else "")


def row_config(row: str, cfg_name: str, overrides: dict, reward: str, root: str, seed: int, quick: bool):
    """A row's config: its experiment file with the reward, the table's sampler/reference, the seed
    and length (`--rl_steps`, `--po_steps`; 0 = the file's own), evaluation every 5 steps' log."""
    base = configs.load(cfg_name)
    rl = "rl" in base
    steps = (_RL_STEPS.value if rl else _PO_STEPS.value) or base.train.num_steps
    if quick:
        steps = 60 if rl else 150
    c = run_config(base, seed, steps, {"reward.kind": reward, **REWARDS[reward], **overrides})
    if rl:
        c.rl.sampler = os.path.join(root, "student" if row == "find_1step" else "reference")
        c.train.log_every = 5
    else:
        c.dpo.reference = os.path.join(root, "reference")
        if quick:
            c.pairs.num_pairs = 2048
    if quick:
        c.eval.num_samples = min(c.eval.num_samples, 2048)
    return c


def make_dependencies(root: str, spec: dict, quick: bool) -> dict:
    """The reference score run and, when a row needs it, the one-step student of the same data
    (f-distill, JS); returns their step counts."""
    teacher = configs.load(spec["score"])
    teacher.train.num_steps = 2000 if quick else (_TEACHER_STEPS.value or teacher.train.num_steps)
    teacher.train.eval_every, teacher.train.log_every = 0, 500
    t0 = time.perf_counter()
    train_row(teacher, os.path.join(root, "reference"), "reference")
    print(f"[reward_rl] reference ready in {time.perf_counter() - t0:.0f}s", flush=True)
    made = {"reference": teacher.train.num_steps}
    if any(row == "find_1step" for row, *_ in spec["rows"]):
        student = configs.override(configs.load("gmm_fdistill"), configs.STUDENT_CONTINUOUS)  # as measured
        student.data = configs.load("gmm_find").data
        student.model = teacher.model
        student.train.num_steps = 300 if quick else _STUDENT_STEPS.value
        student.train.checkpoint_every = student.train.num_steps
        student.train.log_every = 100 if quick else 500
        t0 = time.perf_counter()
        r = train_row(student, os.path.join(root, "student"), "student")
        print(f"[reward_rl] one-step student ready in {time.perf_counter() - t0:.0f}s: hq {r['high_quality_frac']:.3f}, "
              f"modes {r['mode_coverage']:.3f}, TV {r['mode_weight_tv']:.3f}", flush=True)
        made["student"] = student.train.num_steps
    return made


def plot_curves(path: str, curves: dict) -> None:
    """Training reward against reward evaluations and seconds, one panel pair per reward (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(9, 3.2 * len(curves)), squeeze=False)
    for (reward, rows), (ax_e, ax_t) in zip(curves.items(), axes):
        for row, (evals, seconds, rewards) in rows.items():
            ax_e.plot(evals, rewards, label=row)
            ax_t.plot(seconds, rewards, label=row)
        ax_e.set_xlabel("reward evaluations")
        ax_t.set_xlabel("training seconds (2 CPU cores)")
        for ax in (ax_e, ax_t):
            ax.set_ylabel(f"batch reward ({reward})")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    spec = DATA[_DATA.value]
    rewards = _REWARDS.value or spec["rewards"]
    check_choices("rewards", rewards, spec["rewards"])
    rows = spec["rows"]
    root = os.path.abspath(_WORKDIR.value)
    quick = _QUICK.value
    seeds = 1 if quick else (_SEEDS.value or (3 if _DATA.value == "gmm" else 1))
    t_start = time.perf_counter()
    made = make_dependencies(root, spec, quick)

    results, speed, curves, lengths = {}, {}, {}, {}
    for reward in rewards:
        results[reward], speed[reward], curves[reward] = {}, {}, {}
        per_row = {row: [] for row, *_ in rows}
        for seed in range(seeds):
            for row, label, cfg_name, overrides in rows:
                c = row_config(row, cfg_name, overrides, reward, root, seed, quick)
                lengths[row] = (int(c.train.num_steps), int(c.train.batch_size))
                sub = os.path.join(root, reward, row, f"seed_{seed}")
                t0 = time.perf_counter()
                r = train_row(c, sub, f"{reward}/{row} seed {seed}")
                print(f"[reward_rl] {reward}/{row} seed {seed}: reward {r['reward_mean']:.3f} (reference "
                      f"{r['reference/reward_mean']:.3f}), pref {r['preferred_frac']:.3f}, "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
                if "rl" not in c:  # a pair-based row; reward evaluations: the labelled pairs' samples
                    r = {**r, "reward_evals": 2.0 * c.pairs.num_pairs}
                else:
                    curve = training_curve(sub, int(c.train.batch_size))
                    if seed == 0:
                        curves[reward][row] = curve
                    r = {**r, "_curve": curve}
                per_row[row].append(r)
            # Speed at equal alignment, this seed: each sampler's own reference reward plus a common gain.
            gain = 0.5 * min(per_row["find_ode"][seed]["reward_gain"], per_row["ddpo"][seed]["reward_gain"])
            for row, *_ in rows:
                r = per_row[row][seed]
                if "_curve" in r:  # FIND and DDPO rows
                    evals, secs = time_to_level(r.pop("_curve"), r["reference/reward_mean"] + gain)
                    speed[reward].setdefault(row, []).append({"gain": gain, "evals": evals, "seconds": secs})
        for row, *_ in rows:
            results[reward][row] = summarise(per_row[row])

    lines = []
    for reward in rewards:
        title = {"half_plane": " (n . x)", "mode_subset": " (modes 0, 1)", "classifier": " (log p_clf(3 | x))"}
        lines += [f"### reward: {reward}{title[reward]}", "",
                  "| method | steps x batch | " + " | ".join(h for h, *_ in columns(_DATA.value)) + " |",
                  "|---|---|" + "---|" * len(columns(_DATA.value))]
        for row, label, *_ in rows:
            s = results[reward][row]
            n, b = lengths[row]
            lines.append(f"| {label} | {n} x {b} | " + " | ".join(_fmt(s, k, f) for _, k, f in columns(_DATA.value))
                         + " |")
        lines += ["", "Speed to a reward gain G over the sampler's own reference (the training batch's mean reward; "
                      "mean over seeds):", "",
                  "| method | G | reward evals to G | seconds to G |", "|---|---|---|---|"]
        for row, sp in speed[reward].items():
            mean = lambda k: float(np.nanmean([p[k] for p in sp])) if any(np.isfinite(p[k]) for p in sp) else float("nan")
            reached = sum(np.isfinite(p["evals"]) for p in sp)
            lines.append(f"| {row} | {mean('gain'):.3f} | {mean('evals'):.0f} ({reached}/{len(sp)} seeds) | "
                         f"{mean('seconds'):.1f} |")
        ratio = lambda k: (np.nanmean([p[k] for p in speed[reward]["ddpo"]])
                           / np.nanmean([p[k] for p in speed[reward]["find_ode"]]))
        lines += ["", f"DDPO / FIND (ODE sampler) to reach G: {ratio('evals'):.1f}x the reward evaluations, "
                      f"{ratio('seconds'):.1f}x the seconds.", ""]
    table = "\n".join(lines)
    made_text = ", ".join(f"{k}: {v} steps" for k, v in made.items())
    note = f"{_DATA.value}, {seeds} seed(s); {made_text}; total {time.perf_counter() - t_start:.0f}s"
    print("\n" + table + "\n" + note)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(table + "\n" + note + "\n")
    with open(os.path.join(root, "table.json"), "w") as f:
        json.dump({"rows": results, "speed": speed, "note": note}, f, indent=2, sort_keys=True, default=float)
    plot_curves(os.path.join(root, "reward_curves.png"), curves)
    plot_samples(root, rewards[0], rows)


def plot_samples(root: str, reward: str, rows) -> None:
    """DIR/samples.png: the final sample plot of every row's seed 0 on `reward`, beside the
    reference's (each run's own plots/, put side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = os.path.join(root, reward, rows[0][0], "seed_0", "plots")
    paths = [("reference (35-NFE ODE)", os.path.join(first, "reference_samples.png"))]
    for row, label, *_ in rows:
        plots = os.path.join(root, reward, row, "seed_0", "plots")
        finals = sorted(f for f in os.listdir(plots) if f.startswith("samples_"))
        paths.append((label, os.path.join(plots, finals[-1])))
    ncol = 3
    nrow = int(np.ceil(len(paths) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(13, 4.3 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, path) in zip(axes.ravel(), paths):
        ax.imshow(plt.imread(path))
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"seed 0, {reward} reward", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "samples.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
