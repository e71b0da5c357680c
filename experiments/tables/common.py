"""Helpers shared by the table scripts (no flags here, so every table module can import it)."""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

# Rows of this process's table whose runs are finished, in order (`train_row`).
COMPLETED_ROWS: list[str] = []


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
    from fdistill import checkpoint

    tree = checkpoint.restore_tree(workdir)
    ema = (tree.get("ema_params") or {}).get("gen")
    return jax.tree.map(jnp.asarray, ema if ema else tree["params"]["gen"])


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
