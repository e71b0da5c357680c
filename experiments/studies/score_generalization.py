"""Study: generalization of EDM score estimation with a finite training set (issue 16 item 6; the
question of "Neural Network-Based Score Estimation in Diffusion Models: Optimization and
Generalization": does the learned denoiser over-fit the empirical distribution of n points, and
does early stopping help?). Results in `experiments/results/score_generalization.md`.

    python -m experiments.studies.score_generalization --workdir runs/score_generalization \
        [--sizes 64,256,1024,4096,16384,0] [--num_steps 8000] [--num_evals 8] [--seeds 1] \
        [--config.model.width=64 ...]

Every run is `ml_collections_configs/gmm_score.py` (the EDM residual MLP 3x128 on the 8-mode ring)
with `data.num_train = n` for each n of `--sizes` (0 = fresh exact samples every step, an infinite
training set; n > 0 = one fixed set of n exact samples, batches drawn from it with replacement,
`fdistill/data/gmm_source.py`), trained for `--num_steps` steps with train seeds 0..N-1 through
`fdistill.train.train_and_evaluate` in `WORKDIR/<row>/seed_<s>` (`experiments.tables.common`:
re-running resumes or reuses finished runs; SIGTERM / Ctrl-C stops after a checkpoint). The
training set depends only on `data.seed`, so the seeds of one row share it.

Every `num_steps / num_evals` steps the training loop evaluates (eval rows of `metrics.jsonl`) and
checkpoints (all kept). From them, at sigma in SIGMAS, this study reports for the EMA denoiser D
that the run samples with (D* = the exact mixture denoiser, x_sigma = x0 + sigma eps):

- fresh: `denoiser_rel_mse` = E||D - D*||^2 / E||x0 - D*||^2 on 4096 fresh exact points (the loop's
  own evaluation, `fdistill.denoiser.denoiser_errors`): the excess error over the Bayes error;
  final (last step) and best over the evaluated steps (what early stopping on it would keep).
- train: the same ratio with x0 = the first 4096 TRAINING points (recomputed here from the
  checkpoints with the loop's evaluation key), and the training-set excess
  E||D - x0||^2 / E||D* - x0||^2 - 1. On fresh points the excess estimates `denoiser_rel_mse` (the
  cross term vanishes since D* = E[x0 | x_sigma]); on training points it goes below 0 when D
  denoises the training points better than the Bayes denoiser does, i.e. it memorises them.
- memorising reference: `denoiser_rel_mse` on the same fresh points of the empirical-optimal
  denoiser D_n(x; sigma) = sum_i softmax_i(-||x - y_i||^2 / 2 sigma^2) y_i of the n training
  points y_i, the exact minimiser of the training loss over all functions, i.e. where a network
  that fits its training loss perfectly would end.

Writes `WORKDIR/table.md`, `WORKDIR/table.json` (summary, per-seed curves) and `WORKDIR/curves.png`
(fresh error against steps per n and sigma, log scale; training-set excess against steps).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.tables.common import non_negative_ints, run_config, summarise, train_seeds
from fdistill import diffusion, objectives
from fdistill.configs import CONFIG_DIR

SIGMAS = (0.02, 0.2, 2.0)
NUM_POINTS = 4096  # points of every error estimate (as `denoiser_errors`)
DEFAULT_SIZES = ["64", "256", "1024", "4096", "16384", "0"]
DEFAULT_NUM_STEPS = 8000


def define_flags() -> None:
    """The command line's flags (defined when run as a script, so that tests can import this module)."""
    config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "gmm_score.py"), "Base config (gmm_score.py).",
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "Output directory (one sub-workdir per size and seed).")
    flags.DEFINE_list("sizes", DEFAULT_SIZES, "Training-set sizes data.num_train (0 = fresh exact samples).")
    flags.DEFINE_integer("num_steps", DEFAULT_NUM_STEPS, "Training steps per run.")
    flags.DEFINE_integer("num_evals", 8, "Evaluations (and kept checkpoints) along each run.")
    flags.DEFINE_integer("seeds", 1, "Training seeds per size (train.seed = 0..N-1).")
    flags.mark_flags_as_required(["workdir"])


def row_name(n: int) -> str:
    return "fresh" if n == 0 else f"n{n}"


def parse_sizes(values) -> list[int]:
    """--sizes as integers >= 0 (a usage error naming the flag otherwise)."""
    return non_negative_ints("sizes", values, "size", " (0 = fresh samples)")


def size_config(base, n: int, seed: int, num_steps: int, num_evals: int):
    """A run of the study: `base` with data.num_train = n, its seed and length (`run_config`), and an
    evaluation plus a kept checkpoint every num_steps / num_evals steps."""
    c = run_config(base, seed, num_steps, {"data.num_train": n})
    every = max(num_steps // num_evals, 1)
    c.train.eval_every = every
    c.train.checkpoint_every = every
    c.train.keep_checkpoints = num_steps // every + 1
    return c


def eval_key(config) -> jax.Array:
    """The key of the training loop's evaluation (`fdistill.train`: split of PRNGKey(train.seed))."""
    return jax.random.split(jax.random.PRNGKey(int(config.train.seed)))[1]


def fit_errors(denoise, x0, gmm, key, sigmas=SIGMAS) -> dict[str, float]:
    """At each sigma (noise fold_in(key, i), as `denoiser_errors`): rel_mse = E||D - D*||^2 /
    E||x0 - D*||^2 and excess = E||D - x0||^2 / E||x0 - D*||^2 - 1 with x_sigma = x0 + sigma eps,
    D = denoise(x_sigma, sigma [n]) and D* the exact mixture denoiser."""
    x0 = jnp.asarray(x0, jnp.float32)
    out = {}
    for i, s in enumerate(sigmas):
        xt = x0 + s * jax.random.normal(jax.random.fold_in(key, i), x0.shape)
        sig = jnp.full((x0.shape[0],), s)
        d, d_star = denoise(xt, sig), gmm.denoise(xt, sig)
        bayes = jnp.sum((x0 - d_star) ** 2)
        out[f"rel_mse/sigma_{s:g}"] = float(jnp.sum((d - d_star) ** 2) / bayes)
        out[f"excess/sigma_{s:g}"] = float(jnp.sum((d - x0) ** 2) / bayes - 1.0)
    return out


@jax.jit
def _empirical_chunk(points, x, sigma):
    logits = -jnp.sum((x[:, None, :] - points[None, :, :]) ** 2, -1) / (2 * sigma[:, None] ** 2)
    return jax.nn.softmax(logits, axis=-1) @ points


def empirical_denoiser(points, chunk: int = 256):
    """D_n(x; sigma) = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i: the denoiser of the
    empirical distribution of `points` y_i [n, d] (posterior mean of y under x = y + sigma eps),
    the exact minimiser of the denoising loss on that training set. Chunked over the rows of x."""
    points = jnp.asarray(points, jnp.float32)

    def denoise(x, sigma):
        return jnp.concatenate([_empirical_chunk(points, x[i:i + chunk], sigma[i:i + chunk])
                                for i in range(0, x.shape[0], chunk)])
    return denoise


def eval_rows(workdir: str) -> list[dict]:
    """The loop's evaluation rows of metrics.jsonl in step order (the last row of a step wins)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if any(k.startswith("eval/denoiser_rel_mse/") for k in r):
                rows[int(r["step"])] = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
    return [{"step": s, **rows[s]} for s in sorted(rows)]


def run_curve(config, workdir: str) -> list[dict]:
    """Per evaluated step of a finished run: the loop's fresh-point `denoiser_rel_mse` and, for a
    finite training set, the errors on noised training points of that step's checkpoint."""
    from fdistill import checkpoint

    objective = objectives.build(config)
    source, key = objective.source, eval_key(config)
    points = None if source.train_points is None else source.train_points[:NUM_POINTS]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved = {int(name) for name in os.listdir(ckpt_dir) if name.isdigit()} if os.path.isdir(ckpt_dir) else set()
    curve = []
    for r in eval_rows(workdir):
        row = {"step": r["step"], **{f"fresh/sigma_{s:g}": r[f"denoiser_rel_mse/sigma_{s:g}"] for s in SIGMAS}}
        if points is not None and r["step"] in saved:
            tree = checkpoint.restore_tree(workdir, r["step"])
            params = jax.tree.map(jnp.asarray, tree.get("ema_params") or tree["params"])
            fit = fit_errors(lambda x, sig: objective.denoiser(params, x, sig), points, source.gmm, key)
            row.update({f"train_{k}": v for k, v in fit.items()})
        curve.append(row)
    return curve


def memorising_reference(config) -> dict[str, float]:
    """`denoiser_rel_mse` of the empirical-optimal denoiser of the run's training set on the fresh
    points and noise of the loop's evaluation (empty for fresh samples)."""
    source = objectives.build(config).source
    if source.train_points is None:
        return {}
    fresh = source.reference(NUM_POINTS, seed=777)  # the points of `denoiser_errors`
    fit = fit_errors(empirical_denoiser(source.train_points), fresh, source.gmm, eval_key(config))
    return {k.replace("rel_mse/", ""): v for k, v in fit.items() if k.startswith("rel_mse/")}


def summarise_curve(curve: list[dict]) -> dict[str, float]:
    """Final and best-over-steps fresh error (and the best step), final training-point errors."""
    out = {}
    last = curve[-1]
    for s in SIGMAS:
        k = f"sigma_{s:g}"
        vals = [r[f"fresh/{k}"] for r in curve]
        i = int(np.argmin(vals))
        out.update({f"final/{k}": vals[-1], f"best/{k}": vals[i], f"best_step/{k}": float(curve[i]["step"])})
        for part in ("rel_mse", "excess"):
            if f"train_{part}/{k}" in last:
                out[f"train_{part}/{k}"] = last[f"train_{part}/{k}"]
    return out


def run_study(base, workdir: str, sizes: list[int], num_steps: int, num_evals: int = 8, seeds: int = 1) -> dict:
    """Trains (or reuses) every size and seed, writes table.json, table.md and curves.png into
    `workdir` and returns the table.json content."""
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    rows, curves, finals, reference = {}, {}, {}, {}
    for n in sizes:
        row = row_name(n)
        row_curves = []

        def keep(c, sub, seed, results):
            row_curves.append(run_curve(c, sub))

        per_seed = train_seeds("score_generalization", row, workdir, seeds,
                               lambda seed: size_config(base, n, seed, num_steps, num_evals), keep)
        reference[row] = memorising_reference(size_config(base, n, 0, num_steps, num_evals))
        curves[row] = row_curves
        rows[row] = summarise([summarise_curve(cv) for cv in row_curves])
        finals[row] = summarise(per_seed)
        print(f"[score_generalization] {row}: " + ", ".join(
            f"sigma {s:g} final {rows[row][f'final/sigma_{s:g}']['mean']:.4f} best {rows[row][f'best/sigma_{s:g}']['mean']:.4f}"
            for s in SIGMAS), flush=True)
    meta = {"sizes": sizes, "num_steps": num_steps, "num_evals": num_evals, "seeds": seeds, "sigmas": list(SIGMAS),
            "batch_size": int(base.train.batch_size),
            "model": {k: base.model[k] for k in ("name", "width", "depth")},
            "data": {k: base.data[k] for k in ("layout", "num_modes", "mode_std", "radius", "seed")},
            "eval": {"num_samples": int(base.eval.num_samples), "sampler": base.eval.sampler,
                     "nfe": int(diffusion.nfe(base.eval.num_steps, base.eval.sampler))},
            "wall_seconds": time.perf_counter() - t0}
    out = {"meta": meta, "rows": rows, "memorising_reference": reference, "final_eval": finals, "curves": curves}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True, default=float)
    write_markdown(os.path.join(workdir, "table.md"), out)
    plot_curves(os.path.join(workdir, "curves.png"), out)
    return out


def _cell(stats: dict, key: str, fmt: str = "{:.4f}") -> str:
    if key not in stats:
        return "-"
    m = stats[key]
    return fmt.format(m["mean"]) + (" +- " + fmt.format(m["std"]) if m["n"] > 1 else "")


def write_markdown(path: str, out: dict) -> None:
    meta = out["meta"]
    d, m = meta["data"], meta["model"]
    lines = [f"# Score estimation with n training points: excess denoising error on fresh points",
             "",
             f"gmm_score ({m['name']} {m['depth']}x{m['width']}, batch {meta['batch_size']}) on the {d['layout']} of "
             f"{d['num_modes']} modes (std {d['mode_std']:g}, radius {d['radius']:g}), {meta['num_steps']} steps, "
             f"{meta['seeds']} seed(s), evaluated every {meta['num_steps'] // meta['num_evals']} steps (EMA weights). "
             f"Wall time {meta['wall_seconds'] / 60:.1f} min.",
             "",
             "fresh = `denoiser_rel_mse` E||D - D*||^2 / E||x0 - D*||^2 on 4096 fresh points (final step; best over "
             "the evaluated steps, at step); train = the same on 4096 training points; train excess = "
             "E||D - x0||^2 / E||D* - x0||^2 - 1 on training points (< 0: beats the Bayes denoiser there, "
             "i.e. memorises); memorising = `denoiser_rel_mse` of the empirical-optimal denoiser of the n points.",
             "",
             "| n | sigma | fresh final | fresh best | best step | train | train excess | memorising |",
             "|---|---|---|---|---|---|---|---|"]
    order = [row_name(n) for n in meta["sizes"]]  # table.json's keys are sorted
    for row in order:
        stats, ref = out["rows"][row], out["memorising_reference"].get(row, {})
        n = "fresh (inf)" if row == "fresh" else row[1:]
        for s in meta["sigmas"]:
            k = f"sigma_{s:g}"
            mem = f"{ref[k]:.4f}" if k in ref else "-"
            lines.append(f"| {n} | {s:g} | {_cell(stats, 'final/' + k)} | {_cell(stats, 'best/' + k)} | "
                         f"{_cell(stats, 'best_step/' + k, '{:.0f}')} | {_cell(stats, 'train_rel_mse/' + k)} | "
                         f"{_cell(stats, 'train_excess/' + k)} | {mem} |")
    e = meta["eval"]
    lines += ["", f"Final sample metrics ({e['nfe']}-NFE {e['sampler']}, {e['num_samples']} samples, against the exact "
              "mixture):", "",
              "| n | mode coverage | mode-weight TV | high-quality frac | MMD |", "|---|---|---|---|---|"]
    for row in order:
        stats = out["final_eval"][row]
        n = "fresh (inf)" if row == "fresh" else row[1:]
        lines.append(f"| {n} | " + " | ".join(_cell(stats, k, "{:.3f}" if k != "mmd" else "{:.4f}") for k in
                                               ("mode_coverage", "mode_weight_tv", "high_quality_frac", "mmd")) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_curves(path: str, out: dict) -> str:
    """Top: fresh `denoiser_rel_mse` against steps, one line per n (seed 0; dotted: the n points'
    empirical-optimal denoiser); bottom: the training-set excess against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = out["meta"]["sigmas"]
    fig, axes = plt.subplots(2, len(sigmas), figsize=(4.3 * len(sigmas), 7.2), squeeze=False)
    for j, row in enumerate(row_name(n) for n in out["meta"]["sizes"]):
        color, cv = f"C{j}", out["curves"][row][0]
        steps = [r["step"] for r in cv]
        label = "fresh samples" if row == "fresh" else f"n = {row[1:]}"
        ref = out["memorising_reference"].get(row, {})
        for i, s in enumerate(sigmas):
            k = f"sigma_{s:g}"
            axes[0][i].plot(steps, [r[f"fresh/{k}"] for r in cv], "-o", ms=3, color=color, label=label)
            if k in ref:
                axes[0][i].axhline(ref[k], color=color, ls=":", lw=1)
            if f"train_excess/{k}" in cv[-1]:
                axes[1][i].plot(steps, [r.get(f"train_excess/{k}", np.nan) for r in cv], "-s", ms=3, color=color,
                                label=label)
    for i, s in enumerate(sigmas):
        axes[0][i].set(yscale="log", title=f"fresh points, sigma = {s:g}", xlabel="training step")
        axes[1][i].set_yscale("symlog", linthresh=1e-2)
        axes[1][i].set(title=f"training points, sigma = {s:g}", xlabel="training step")
        axes[1][i].axhline(0.0, color="gray", lw=0.8)
    axes[0][0].set_ylabel("denoiser_rel_mse (dotted: memorising)")
    axes[1][0].set_ylabel("training-set excess (< 0: memorises)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    sizes = parse_sizes(f.sizes)
    for name in ("num_steps", "num_evals", "seeds"):
        if f[name].value < 1:
            raise app.UsageError(f"--{name}={f[name].value} must be >= 1")
    logging.set_verbosity(logging.WARNING)
    workdir = os.path.abspath(f.workdir)
    run_study(f.config, workdir, sizes, f.num_steps, f.num_evals, f.seeds)
    print(open(os.path.join(workdir, "table.md")).read(), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
