"""Table: reward optimisation of a GMM diffusion sampler - FIND and DDPO beside Diffusion-DPO and MaPO.

    python -m experiments.tables.reward_rl --workdir runs/table_reward_rl

1. Trains the reference score run (ml_collections_configs/gmm_score.py) into DIR/reference and a
   one-step f-distill student of the same (balanced 8-mode) ring into DIR/student (reused when finished).
2. For each reward (`--rewards`: the half-plane r = n . x, and the posterior mass of modes {0, 1}) and
   seed, trains into DIR/<reward>/<row>/seed_<s>:
   * find_ode: FIND (arXiv 2407.19453) on the reference's 35-NFE Heun ODE sampler;
   * find_1step: FIND on the one-step student (one network call per reward evaluation);
   * ddpo: DDPO_IS (arXiv 2305.13301) on the reference's 20-level ancestral sampler;
   * dpo, mapo: Diffusion-DPO (beta 50) and MaPO (beta 0.01) on Bradley-Terry pairs of the
     reference's samples (the rows of experiments/tables/diffusion_preference.py).
3. Prints and writes DIR/table.md, DIR/table.json, DIR/reward_curves.png (training reward against
   reward evaluations and seconds, seed 0) and DIR/samples.png (seed 0, half-plane reward).

Columns: reward (mean r of 8192 samples; FIND: z from the trained distribution; DDPO: the trained
stochastic sampler), its reference's (the same sampler untrained, same noise), pref = preferred
fraction, pref&data = preferred and within 3 mode stds of a mode, hq, modes kept (of 8), MMD to the
reference's samples, KL(policy || N(0, I)) for FIND, and reward evaluations used (FIND, DDPO: steps x
batch; DPO/MaPO: the 2 x num_pairs labelled samples). Speed at equal alignment: the reward evaluations
and training seconds (same machine, same run) until the training batch's mean reward first reaches
the level L = reference + 0.5 x (the smaller final gain of find_ode and ddpo), per seed.
About 40 minutes on 2 CPU cores (`--quick` for a few-minute smoke run).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from experiments.tables.common import check_choices, run_config, summarise, train_row
from fdistill import configs

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the reference, the student, the runs and the table.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per row.")
_REWARDS = flags.DEFINE_list("rewards", ["half_plane", "mode_subset"], "Rewards (config.reward.kind) to optimise.")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 300, "FIND and DDPO steps (each: one batch of 256 reward evaluations).")
_PO_STEPS = flags.DEFINE_integer("po_steps", 1000, "Diffusion-DPO and MaPO steps.")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 20000, "Score-matching steps of the reference.")
_STUDENT_STEPS = flags.DEFINE_integer("student_steps", 4000, "Generator updates of the one-step student.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: short reference, student and rows, one seed.")
flags.mark_flag_as_required("workdir")

REWARDS = {"half_plane": {}, "mode_subset": {"reward.modes": (0, 1)}}
ROWS = [  # (row, label, config, overrides)
    ("find_ode", "FIND, 35-NFE ODE", "gmm_find", {}),
    ("find_1step", "FIND, 1-step student", "gmm_find", {}),
    ("ddpo", "DDPO_IS, 20-step ancestral", "gmm_ddpo", {"train.learning_rate": 1e-5}),
    ("dpo", "Diffusion-DPO, beta 50", "gmm_diffusion_dpo", {"dpo.beta": 50.0, "train.learning_rate": 3e-4}),
    ("mapo", "MaPO, beta 0.01", "gmm_mapo", {"dpo.beta": 0.01, "train.learning_rate": 3e-4}),
]
RL_ROWS = ("find_ode", "find_1step", "ddpo")
COLUMNS = [  # (header, results key, format)
    ("reward", "reward_mean", "{:.3f}"),
    ("ref reward", "reference/reward_mean", "{:.3f}"),
    ("pref", "preferred_frac", "{:.3f}"),
    ("pref&data", "preferred_on_data_frac", "{:.3f}"),
    ("hq", "sample/high_quality_frac", "{:.3f}"),
    ("modes", "sample/mode_coverage", "modes"),
    ("MMD ref", "mmd_to_reference", "{:.4f}"),
    ("KL prior", "kl_to_prior", "{:.2f}"),
    ("reward evals", "reward_evals", "{:.0f}"),
]


def _fmt(summary: dict, key: str, fmt: str) -> str:
    if key not in summary:
        return "-"
    m, s = summary[key]["mean"], summary[key]["std"]
    if fmt == "modes":
        return f"{8 * m:.1f}/8"
    return fmt.format(m) + (f" ± {fmt.format(s)}" if summary[key]["n"] > 1 and fmt != "{:.0f}" else "")


def training_curve(workdir: str, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reward evaluations, training seconds, batch mean reward) at each logged step of a FIND/DDPO
    run (seconds from the logged steps/s of each interval: compile time excluded)."""
    steps, rewards, seconds, t, prev = [], [], [], 0.0, 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if "reward" not in row or "steps_per_sec" not in row:
                continue
            t += (row["step"] - prev) / max(row["steps_per_sec"], 1e-9)
            prev = row["step"]
            steps.append(row["step"])
            rewards.append(row["reward"])
            seconds.append(t)
    return np.asarray(steps) * batch, np.asarray(seconds), np.asarray(rewards)


def time_to_level(curve, level: float) -> tuple[float, float]:
    """(reward evaluations, seconds) at the first logged step whose batch reward reaches `level`
    (nan when it never does)."""
    evals, seconds, rewards = curve
    hit = np.nonzero(rewards >= level)[0]
    return (float(evals[hit[0]]), float(seconds[hit[0]])) if len(hit) else (float("nan"), float("nan"))


def row_config(row: str, cfg_name: str, overrides: dict, reward: str, root: str, seed: int, quick: bool):
    base = configs.load(cfg_name)
    steps = (60 if quick else _RL_STEPS.value) if row in RL_ROWS else (150 if quick else _PO_STEPS.value)
    over = {"reward.kind": reward, **REWARDS[reward], **overrides}
    c = run_config(base, seed, steps, over)
    if row in RL_ROWS:
        c.rl.sampler = os.path.join(root, "student" if row == "find_1step" else "reference")
        c.train.log_every = 5
    else:
        c.dpo.reference = os.path.join(root, "reference")
        if quick:
            c.pairs.num_pairs = 2048
    if quick:
        c.eval.num_samples = 2048
    return c


def make_dependencies(root: str, quick: bool) -> None:
    """The reference score run and the one-step student (the balanced ring of the reward configs)."""
    teacher = configs.load("gmm_score")
    teacher.train.num_steps = 2000 if quick else _TEACHER_STEPS.value
    teacher.train.eval_every, teacher.train.log_every = 0, 500
    t0 = time.perf_counter()
    train_row(teacher, os.path.join(root, "reference"), "reference")
    print(f"[reward_rl] reference ready in {time.perf_counter() - t0:.0f}s", flush=True)
    student = configs.load("gmm_fdistill")
    student.data = configs.load("gmm_find").data
    student.model = teacher.model
    student.train.num_steps = 300 if quick else _STUDENT_STEPS.value
    student.train.checkpoint_every = student.train.num_steps
    student.train.log_every = 100 if quick else 500
    t0 = time.perf_counter()
    r = train_row(student, os.path.join(root, "student"), "student")
    print(f"[reward_rl] one-step student ready in {time.perf_counter() - t0:.0f}s: hq {r['high_quality_frac']:.3f}, "
          f"modes {r['mode_coverage']:.3f}, TV {r['mode_weight_tv']:.3f}", flush=True)


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
    check_choices("rewards", _REWARDS.value, list(REWARDS))
    root = os.path.abspath(_WORKDIR.value)
    quick = _QUICK.value
    seeds = 1 if quick else _SEEDS.value
    t_start = time.perf_counter()
    make_dependencies(root, quick)

    results, speed, curves = {}, {}, {}
    for reward in _REWARDS.value:
        results[reward], speed[reward], curves[reward] = {}, {}, {}
        per_row = {row: [] for row, *_ in ROWS}
        for seed in range(seeds):
            for row, label, cfg_name, overrides in ROWS:
                c = row_config(row, cfg_name, overrides, reward, root, seed, quick)
                sub = os.path.join(root, reward, row, f"seed_{seed}")
                t0 = time.perf_counter()
                r = train_row(c, sub, f"{reward}/{row} seed {seed}")
                per_row[row].append(r)
                print(f"[reward_rl] {reward}/{row} seed {seed}: reward {r['reward_mean']:.3f} (reference "
                      f"{r['reference/reward_mean']:.3f}), pref&data {r['preferred_on_data_frac']:.3f}, "
                      f"hq {r['sample/high_quality_frac']:.3f}, {time.perf_counter() - t0:.0f}s", flush=True)
                if row in RL_ROWS:
                    curve = training_curve(sub, int(c.train.batch_size))
                    if seed == 0:
                        curves[reward][row] = curve
                    per_row[row][-1] = {**r, "_curve": curve}
            # Speed at equal alignment, this seed.
            find, ddpo = per_row["find_ode"][seed], per_row["ddpo"][seed]
            ref = 0.5 * (find["reference/reward_mean"] + ddpo["reference/reward_mean"])
            level = ref + 0.5 * min(find["reward_gain"], ddpo["reward_gain"])
            for row in RL_ROWS:
                evals, secs = time_to_level(per_row[row][seed].pop("_curve"), level)
                speed[reward].setdefault(row, []).append({"level": level, "evals": evals, "seconds": secs})
        for row, *_ in ROWS:
            results[reward][row] = summarise(per_row[row])

    # The table.
    lines = []
    for reward in _REWARDS.value:
        lines += [f"### reward: {reward}" + (" (modes 0, 1)" if reward == "mode_subset" else " (n . x)"), "",
                  "| method | " + " | ".join(h for h, *_ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for row, label, *_ in ROWS:
            s = results[reward][row]
            if row in ("dpo", "mapo") and "reward_evals" not in s:
                n_pairs = configs.load("gmm_diffusion_dpo").pairs.num_pairs if not quick else 2048
                s["reward_evals"] = {"mean": 2.0 * n_pairs, "std": 0.0, "n": 1}
            lines.append(f"| {label} | " + " | ".join(_fmt(s, k, f) for _, k, f in COLUMNS) + " |")
        lines += ["", "Speed to the reward level L (mean over seeds; the training batch's reward):", "",
                  "| method | L | reward evals to L | seconds to L |", "|---|---|---|---|"]
        for row in RL_ROWS:
            sp = speed[reward][row]
            mean = lambda k: float(np.nanmean([p[k] for p in sp])) if any(np.isfinite(p[k]) for p in sp) else float("nan")
            reached = sum(np.isfinite(p["evals"]) for p in sp)
            lines.append(f"| {row} | {mean('level'):.3f} | {mean('evals'):.0f} ({reached}/{len(sp)} seeds) | "
                         f"{mean('seconds'):.1f} |")
        ratio_e = np.nanmean([p["evals"] for p in speed[reward]["ddpo"]]) / np.nanmean(
            [p["evals"] for p in speed[reward]["find_ode"]])
        ratio_t = np.nanmean([p["seconds"] for p in speed[reward]["ddpo"]]) / np.nanmean(
            [p["seconds"] for p in speed[reward]["find_ode"]])
        lines += ["", f"DDPO / FIND (ODE sampler) to reach L: {ratio_e:.1f}x the reward evaluations, "
                      f"{ratio_t:.1f}x the seconds.", ""]
    table = "\n".join(lines)
    note = (f"{seeds} seed(s); FIND/DDPO {60 if quick else _RL_STEPS.value} steps of 256 samples, "
            f"Diffusion-DPO/MaPO {150 if quick else _PO_STEPS.value} steps of 256 pairs; reference: "
            f"{2000 if quick else _TEACHER_STEPS.value} score-matching steps; one-step student: "
            f"{300 if quick else _STUDENT_STEPS.value} f-distill (JS) updates; total {time.perf_counter() - t_start:.0f}s")
    print("\n" + table + "\n" + note)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(table + "\n" + note + "\n")
    with open(os.path.join(root, "table.json"), "w") as f:
        json.dump({"rows": results, "speed": speed, "note": note}, f, indent=2, sort_keys=True, default=float)
    plot_curves(os.path.join(root, "reward_curves.png"), curves)
    plot_samples(root)


def plot_samples(root: str) -> None:
    """DIR/samples.png: the final sample plot of every row's seed 0 on the first reward, beside the
    reference's (each run's own plots/, put side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward = _REWARDS.value[0]
    paths = [("reference (35-NFE ODE)", os.path.join(root, reward, "find_ode", "seed_0", "plots", "reference_samples.png"))]
    for row, label, *_ in ROWS:
        plots = os.path.join(root, reward, row, "seed_0", "plots")
        finals = sorted(f for f in os.listdir(plots) if f.startswith("samples_"))
        paths.append((label, os.path.join(plots, finals[-1])))
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for ax, (label, path) in zip(axes.ravel(), paths):
        ax.imshow(plt.imread(path))
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"seed 0, {reward} reward", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "samples.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
