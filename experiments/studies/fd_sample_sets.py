"""How much fd_digits moves with the sample set: finished one-step digits students against their teacher
on N samples, and on K disjoint sets of N / K (results in `experiments/results/digits_curve.md`).

    python -m experiments.studies.fd_sample_sets --runs W/run_a,W/run_b --out DIR [--num_samples 16384] [--sets 4]

Every run in `--runs` is a finished digits distillation workdir (`digits_fdistill.py` and variants) of
one teacher. Draws `--num_samples` samples of each student (its EMA generator at its last checkpoint)
and of the teacher (`config.eval.num_steps` Heun steps of the teacher's EMA denoiser),
and reports the plug-in Frechet distance (fd_digits) and FD-infinity (fd_digits_inf, with the slope c
of FD(n) = FD_inf + c / n; `fdistill.evaluation.frechet`) on all samples and on `--sets` disjoint
sets, with each student's ratio to the teacher. A second table splits the distance: `class_tv` (the
classifier's class histogram of the samples against the train split's class frequencies) and
FD-infinity of the largest subset of all samples whose predicted classes have the train split's
frequencies ("class-balanced": what is left when the class weights are right). Writes
DIR/fd_sample_sets.md, .json and .png (the subset FDs against 1/n with the fitted lines, all samples
and set 1), and keeps each model's samples in DIR/samples_<model>_<n>.npy: a re-run reuses them. The
teacher's 16384 35-NFE samples take about 7 minutes on one CPU core.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags

from experiments.tables.common import final_samples
from fdistill import configs, objectives
from fdistill import data as data_lib
from fdistill.data.digits import NUM_CLASSES
from fdistill.denoiser import sample_chunked
from fdistill.evaluation import feature_metrics, frechet
from fdistill.evaluation.digits_classifier import FEATURE_DIM
from fdistill.objectives.score import load_teacher

_RUNS = flags.DEFINE_list("runs", None, "Workdirs of finished digits distillation runs (one teacher).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16384, "Samples per model.")
_SETS = flags.DEFINE_integer("sets", 4, "Disjoint sample sets (each num_samples / sets).")
flags.mark_flags_as_required(["runs", "out"])
MIN_SAMPLES = frechet.FD_INF_SAMPLES_PER_DIM * FEATURE_DIM  # per set: the fewest samples with an FD-infinity


def fd_rows(reference, features: np.ndarray, sets: int) -> list[dict]:
    """Plug-in FD and FD-infinity of all `features`, then of each of `sets` disjoint equal parts."""
    parts = [("all", features)] + [(f"set {i + 1}", p) for i, p in enumerate(np.array_split(features, sets))]
    rows = []
    for name, f in parts:
        fit = frechet.frechet_distance_infinity(reference, f)
        rows.append({"set": name, "n": len(f), "fd_digits": frechet.frechet_distance_features(reference, f),
                     "fd_digits_inf": fit.value, "slope": fit.slope, "sizes": fit.sizes.tolist(),
                     "subset_fds": fit.fds.tolist()})
    return rows


def class_balanced(predicted: np.ndarray, data_classes: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices of the largest subset whose classes in `predicted` have the frequencies of `data_classes`
    (drawn without replacement within each class)."""
    target = feature_metrics.class_histogram(data_classes, NUM_CLASSES)
    counts = np.bincount(predicted, minlength=NUM_CLASSES)
    total = np.min(counts[target > 0] / target[target > 0])
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(predicted == k), int(target[k] * total), replace=False)
                           for k in range(NUM_CLASSES)])


def class_rows(reference, features, predicted, data_classes, fd_inf_all: float) -> dict:
    """class_tv, FD-infinity of all samples (`fd_inf_all`, from `fd_rows`) and of the class-balanced subset."""
    balanced = class_balanced(predicted, data_classes)
    return {"class_tv": feature_metrics.class_tv(predicted, data_classes, NUM_CLASSES),
            "fd_digits_inf": fd_inf_all,
            "balanced_n": len(balanced),
            "balanced_fd_digits_inf": frechet.frechet_distance_infinity(reference, features[balanced]).value}


def teacher_samples(config, shape, n: int) -> np.ndarray:
    """n samples of the teacher's EMA denoiser with the run's evaluation sampler (`config.eval`)."""
    denoiser, params, tconfig = load_teacher(config.distill.teacher)
    e = config.eval
    return np.asarray(sample_chunked(denoiser, params, shape, jax.random.PRNGKey(1), n, int(e.num_steps),
                                     str(e.sampler), tconfig.diffusion, int(e.chunk), tconfig.model.num_classes))


def class_table(classes: dict) -> list[str]:
    t = classes["teacher"]
    lines = ["| model | class_tv | fd_digits_inf | / teacher | class-balanced fd_digits_inf (samples) | / teacher |",
             "|---|---|---|---|---|---|"]
    for model, r in classes.items():
        lines.append(f"| {model} | {r['class_tv']:.3f} | {r['fd_digits_inf']:.2f} | "
                     f"{r['fd_digits_inf'] / t['fd_digits_inf']:.2f} | {r['balanced_fd_digits_inf']:.2f} "
                     f"({r['balanced_n']}) | {r['balanced_fd_digits_inf'] / t['balanced_fd_digits_inf']:.2f} |")
    return lines


def table(results: dict) -> list[str]:
    teacher = results["teacher"]
    sets = [r["set"] for r in teacher]
    lines = ["| model | metric | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    for model, rows in results.items():
        for key in ("fd_digits", "fd_digits_inf"):
            lines.append(f"| {model} | {key} | " + " | ".join(f"{r[key]:.2f}" for r in rows) + " |")
            if model != "teacher":
                lines.append(f"| {model} | {key} / teacher | " +
                             " | ".join(f"{r[key] / t[key]:.2f}" for r, t in zip(rows, teacher)) + " |")
        lines.append(f"| {model} | slope c | " + " | ".join(f"{r['slope']:.0f}" for r in rows) + " |")
    return lines


def plot(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, which in zip(axes, (0, 1)):
        for (model, rows), color in zip(results.items(), plt.cm.tab10.colors):
            r = rows[which]
            inv = 1.0 / np.array(r["sizes"])
            ax.plot(inv, r["subset_fds"], "o", ms=3, color=color, label=f"{model}: FD_inf {r['fd_digits_inf']:.2f}")
            grid = np.linspace(0.0, inv.max(), 50)
            ax.plot(grid, r["fd_digits_inf"] + r["slope"] * grid, "-", lw=1, color=color)
        ax.set_xlim(left=0.0)
        ax.set_xlabel("1 / n (n = subset size)")
        ax.set_ylabel("fd_digits of subsets of n samples")
        ax.set_title(f"{rows[which]['set']} ({rows[which]['n']} samples)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _SETS.value < 1 or _NUM_SAMPLES.value < MIN_SAMPLES * _SETS.value:
        raise app.UsageError(f"--num_samples={_NUM_SAMPLES.value} must be >= {MIN_SAMPLES} x --sets={_SETS.value} "
                             f"(FD-infinity needs {frechet.FD_INF_SAMPLES_PER_DIM} x the feature dimension per set)")
    run_configs = {}
    for workdir in _RUNS.value:
        path = os.path.join(workdir, "config.json")
        if not os.path.exists(os.path.join(workdir, "results.json")):
            raise app.UsageError(f"--runs: {workdir!r} is not a finished run's workdir (no results.json)")
        config = configs.load_json(path)
        if config.objective != "distill" or config.data.name != "digits":
            raise app.UsageError(f"--runs: {workdir!r} holds a {config.objective!r} run on {config.data.name!r} data; "
                                 "expected a digits distillation run (digits_fdistill.py and variants)")
        name = os.path.basename(os.path.normpath(workdir))
        if name in run_configs or name == "teacher":
            raise app.UsageError(f"--runs: two runs are named {name!r} (the workdirs' last components must differ)")
        run_configs[name] = (workdir, config)
    teachers = {os.path.abspath(c.distill.teacher) for _, c in run_configs.values()}
    if len(teachers) != 1:
        raise app.UsageError(f"--runs must share one teacher (config.distill.teacher); they name {sorted(teachers)}")
    first = next(iter(run_configs.values()))[1]
    source = data_lib.build(first.data)
    reference = source.reference_features()

    os.makedirs(_OUT.value, exist_ok=True)
    n = _NUM_SAMPLES.value

    def samples(name, draw):
        path = os.path.join(_OUT.value, f"samples_{name}_{n}.npy")
        if not os.path.exists(path):
            print(f"[fd_sample_sets] {name}: {n} samples", flush=True)
            np.save(path + ".tmp.npy", np.asarray(draw(), np.float32))
            os.replace(path + ".tmp.npy", path)  # a killed run leaves no half-written samples
        x = np.load(path)
        return source.classifier.features_and_probs(np.clip(np.nan_to_num(x), -1.0, 1.0))

    print(f"[fd_sample_sets] teacher {teachers.pop()}", flush=True)
    draws = {"teacher": lambda: teacher_samples(first, source.shape, n)}
    for name, (workdir, config) in run_configs.items():
        draws[name] = lambda workdir=workdir, config=config: final_samples(objectives.build(config), workdir, n)
    results, classes = {}, {}
    for name, draw in draws.items():
        feats, probs = samples(name, draw)
        results[name] = fd_rows(reference, feats, _SETS.value)
        classes[name] = class_rows(reference, feats, probs.argmax(1), source.labels, results[name][0]["fd_digits_inf"])
    lines = ([f"# fd_digits on {n} samples and on {_SETS.value} disjoint sets", ""] + table(results) +
             ["", "## Class weights against the rest", ""] + class_table(classes))
    with open(os.path.join(_OUT.value, "fd_sample_sets.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(_OUT.value, "fd_sample_sets.json"), "w") as f:
        json.dump({"sets": results, "classes": classes}, f, indent=1)
    plot(os.path.join(_OUT.value, "fd_sample_sets.png"), results)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main)
