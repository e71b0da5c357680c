"""Helpers shared by the table scripts (no flags here, so every table module can import it)."""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import configs

# Rows of this process's table whose runs are finished, in order (`train_row`).
COMPLETED_ROWS: list[str] = []


def check_choices(flag: str, values, allowed) -> None:
    """A command-line usage error naming `--flag=value` and the allowed values, for the first value
    of a list flag that is not in `allowed` (checked before anything trains)."""
    from absl import app

    for v in values:
        if v not in allowed:
            raise app.UsageError(f"--{flag}={v!r} is not allowed; allowed: {list(allowed)}")


def non_negative_ints(flag: str, values, what: str, hint: str = "") -> list[int]:
    """A list flag's values as integers >= 0; a command-line usage error naming `--flag=value`
    otherwise (checked before anything trains)."""
    from absl import app

    ints = []
    for v in values:
        try:
            n = int(v)
        except ValueError:
            n = -1
        if n < 0:
            raise app.UsageError(f"--{flag}={v!r}: every {what} must be an integer >= 0{hint}")
        ints.append(n)
    return ints


def train_row(config, workdir: str, row: str) -> dict:
    """Trains one table row's run (or resumes it, or reuses it when finished) with
    `fdistill.train.train_and_evaluate` and returns its results.

    When SIGTERM or Ctrl-C stops the run (after it saved a checkpoint), the table stops too: this
    prints which rows are complete and that re-running the same command resumes, then exits with
    the signal's status (143 for SIGTERM, 130 for SIGINT) instead of going on to the next row."""
    from fdistill import train

    try:
        results = train.train_and_evaluate(config, workdir)
    except train.Stopped as e:
        done = ", ".join(COMPLETED_ROWS) or "none"
        print(f"[table] {e.signal_name} stopped row {row!r}: {e}. Complete rows: {done}. "
              f"Re-running the same command resumes (finished rows are reused, {row!r} continues from {workdir}).",
              flush=True)
        sys.exit(e.code)
    COMPLETED_ROWS.append(row)
    return dict(results)


def run_config(base, seed: int, num_steps: int, overrides: dict):
    """A table run's config: `base` with `overrides` ({'section.field': value}), the seed, the
    table's length, one checkpoint at the end, ten log rows and no mid-run evaluation."""
    c = configs.override(base.copy_and_resolve_references(), overrides)
    c.train.seed = seed
    c.train.num_steps = num_steps
    c.train.checkpoint_every = num_steps
    c.train.log_every = max(num_steps // 10, 1)
    c.train.eval_every = 0
    return c


def train_seeds(tag: str, row: str, workdir: str, seeds: int, make_config, on_result=None) -> list[dict]:
    """Trains seeds 0..seeds-1 of one table row in `workdir/<row>/seed_<s>` (`train_row`) and returns
    their results; `on_result(config, sub_workdir, seed, results)` may add entries to `results`."""
    per_seed = []
    for seed in range(seeds):
        c = make_config(seed)
        sub = os.path.join(workdir, row, f"seed_{seed}")
        print(f"[{tag}] {row} seed {seed} -> {sub}", flush=True)
        results = train_row(c, sub, f"{row} seed {seed}")
        if on_result is not None:
            on_result(c, sub, seed, results)
        per_seed.append(results)
    return per_seed


def summarise(per_seed: list[dict]) -> dict:
    """Mean, std and count over seeds of every numeric metric: {key: {'mean', 'std', 'n'}}."""
    out = {}
    for k in sorted(set().union(*per_seed)):
        vals = np.array([r[k] for r in per_seed if isinstance(r.get(k), (int, float))], np.float64)
        if len(vals):
            out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=0)), "n": int(len(vals))}
    return out


def generator_params(workdir: str):
    """The generator parameters a finished distillation run samples with (its EMA when it keeps one)."""
    from fdistill import runs

    run = runs.open_run(workdir, "workdir", runs.STUDENT_RUNS, "gmm_fdistill", allow_unfinished=True)
    return jax.tree.map(jnp.asarray, runs.restore_generator(run))


def final_samples(objective, workdir: str, n: int, step: int | None = None) -> np.ndarray:
    """Student samples (the objective's sampler: one step, or K; or the output of step `step` of a
    K-step rollout) from the run's last checkpoint, with the same key as its evaluation."""
    return objective.evaluator.samples(generator_params(workdir), jax.random.PRNGKey(0), n, step=step)[0]


def small_mode_mass(objective, x: np.ndarray, k: int = 2) -> float:
    """Student mass on the k lightest GMM modes divided by their true mass (1 = exact, 0 = dropped)."""
    from fdistill.evaluation.samples import mode_histogram

    gmm = objective.source.gmm
    w = np.asarray(gmm.weights)
    small = np.argsort(w)[:k]
    return float(mode_histogram(x, gmm)[small].sum() / w[small].sum())


def plot_panels(path: str, objective, samples: dict, title_extra: dict, ncol: int = 4,
                title: str = "1-step students (red) over teacher data (grey)") -> None:
    """One scatter panel per entry of `samples` (name -> (n, 2+) student samples, red) over the
    objective's reference data (grey); `title_extra[name]` is appended to the panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    ncol = min(len(names), ncol)
    nrow = int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    ref = objective.source.reference(4096)
    lim = float(np.abs(ref[:, :2]).max()) * 1.3
    for ax in axes.ravel():
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        x = samples[name]
        ax.axis("on")
        ax.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.3, c="tab:gray")
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, c="tab:red")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}  {title_extra.get(name, '')}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_image_rows(grids, path: str) -> None:
    """One labelled strip of images per entry of `grids` ([(name, images [n, H, W, C] in [-1, 1])])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fdistill.data.images import image_grid

    ncols = 15
    rows_per = max(int(np.ceil(len(x) / ncols)) for _, x in grids)
    fig, axes = plt.subplots(len(grids), 1, figsize=(8, (0.55 * rows_per + 0.35) * len(grids) + 0.3))
    for ax, (name, x) in zip(np.atleast_1d(axes), grids):
        g = image_grid(np.asarray(x), ncols=min(ncols, len(x)))
        ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_curve(workdir: str, metric: str) -> list[dict]:
    """A run's evaluations in step order: the eval/* entries of metrics.jsonl that hold `metric`
    (prefix stripped), and its final results.json when that is a later step."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if f"eval/{metric}" in r:
                rows.append({"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}})
    with open(os.path.join(workdir, "results.json")) as f:
        final = json.load(f)
    if not rows or rows[-1]["step"] != final["step"]:
        rows.append(final)
    return rows


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
