"""Table: the DPO family on the known-reward synthetic language (true reward, KL, length, win rate).

    python -m experiments.tables.preference --workdir runs/table_preference [--seeds 3] \
        [--losses dpo,ipo,ln_dpo,simpo,rpo,orpo] [--steps 500] [--beta ln_dpo=1.0,simpo=2.0]

1. Trains the SFT policy (ml_collections_configs/synthetic_sft.py) into DIR/sft (reused when done).
2. For each seed s: samples preference pairs from the SFT policy (pairs seed s, Bradley-Terry labels
   on the true reward; a local TFDS dataset under DIR/sft/preference_data) and fine-tunes the SFT
   policy with every loss (ml_collections_configs/synthetic_dpo.py, training seed s) into
   DIR/runs/<loss>_s<seed>. Finished runs are reused, so an interrupted table resumes.
3. Writes DIR/table.md, DIR/table.json (per-seed results and means) and DIR/frontier.png (true
   reward against KL(policy || SFT), one point per run).

Columns (mean +- std over seeds, responses sampled at temperature 1 on the 146 held-out prompts,
8 per prompt): true reward (the best possible is 2.7), KL to the SFT reference (nats per response,
Monte-Carlo), mean length (words; the optimum is 3), win rate against the SFT policy's responses
(ties 1/2), fraction of optimal responses, and the implicit-reward accuracy on training pairs and on
pairs of held-out prompts. About 12 minutes on 2 CPU cores with the defaults.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from fdistill.configs import load as load_config

DEFAULT_LOSSES = "dpo,ipo,ln_dpo,simpo,rpo,orpo"
# beta per loss (and the loss-specific parameters of synthetic_dpo.py). The length-normalised losses
# compare per-token log-ratios (about 1/7 of the summed ones here), hence their larger beta.
BETAS = {"dpo": 0.1, "cdpo": 0.1, "ipo": 0.1, "hinge": 0.1, "ln_dpo": 1.0, "simpo": 2.0, "rpo": 0.1, "orpo": 0.1}

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the SFT run, the PO runs and the table.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per loss (pairs and training order).")
_LOSSES = flags.DEFINE_string("losses", DEFAULT_LOSSES, "Comma-separated preference losses.")
_STEPS = flags.DEFINE_integer("steps", 500, "Preference-optimisation steps per run.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 0, "SFT steps (0: the synthetic_sft.py default).")
_BETA = flags.DEFINE_string("beta", "", "Overrides of the per-loss beta, e.g. 'dpo=0.2,simpo=2.5'.")
flags.mark_flag_as_required("workdir")

COLUMNS = [  # (header, results key, format)
    ("true reward", "true_reward", "{:.3f}"),
    ("KL to SFT", "kl_to_ref", "{:.2f}"),
    ("length", "mean_length", "{:.2f}"),
    ("win rate vs SFT", "win_rate_vs_ref", "{:.3f}"),
    ("optimal", "optimal_frac", "{:.3f}"),
    ("acc (train pairs)", "rewards/accuracies", "{:.3f}"),
    ("acc (held-out pairs)", "heldout/rewards/accuracies", "{:.3f}"),
]


def parse_betas(text: str, losses: list[str]) -> dict[str, float]:
    betas = dict(BETAS)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in BETAS or not value:
            raise ValueError(f"--beta entry {item!r} must be <loss>=<value> with loss in {sorted(BETAS)}")
        betas[name] = float(value)
    unknown = [n for n in losses if n not in BETAS]
    if unknown:
        raise ValueError(f"--losses has unknown loss(es) {unknown}; allowed: {sorted(BETAS)}")
    return betas


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarise(runs: dict[str, list[dict]], sft: dict) -> dict:
    """{row: {key: [mean, std]}} with an 'sft' row from the reference's own samples."""
    rows = {"sft (reference)": {
        "true_reward": mean_std([r["ref/true_reward"] for rs in runs.values() for r in rs]),
        "kl_to_ref": (0.0, 0.0),
        "mean_length": mean_std([r["ref/mean_length"] for rs in runs.values() for r in rs]),
        "win_rate_vs_ref": (0.5, 0.0),
        "optimal_frac": mean_std([r["ref/optimal_frac"] for rs in runs.values() for r in rs]),
    }}
    for name, rs in runs.items():
        rows[name] = {key: mean_std([r[key] for r in rs]) for _, key, _ in COLUMNS}
    return rows


def markdown(rows: dict, header: str) -> str:
    lines = [header, "", "| loss | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, row in rows.items():
        cells = []
        for _, key, fmt in COLUMNS:
            if key in row:
                m, s = row[key]
                cells.append(fmt.format(m) + (f" ± {fmt.format(s)}" if s else ""))
            else:
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(path: str, runs: dict[str, list[dict]], best: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ref = [r["ref/true_reward"] for rs in runs.values() for r in rs]
    ax.scatter([0.0], [np.mean(ref)], marker="*", s=180, color="k", label="SFT (reference)", zorder=3)
    for i, (name, rs) in enumerate(runs.items()):
        kl = [r["kl_to_ref"] for r in rs]
        tr = [r["true_reward"] for r in rs]
        ax.scatter(kl, tr, color=f"C{i}", label=f"{name} (len {np.mean([r['mean_length'] for r in rs]):.1f})")
    ax.axhline(best, color="gray", ls="--", lw=1, label=f"best possible ({best:g})")
    ax.set(xlabel="KL(policy || SFT) [nats / response]", ylabel="true reward (held-out prompts)",
           title="Reward vs KL on the synthetic language")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "fdistill_jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from fdistill import train

    workdir = os.path.abspath(_WORKDIR.value)
    losses = [n.strip() for n in _LOSSES.value.split(",") if n.strip()]
    betas = parse_betas(_BETA.value, losses)
    t_start = time.perf_counter()

    sft_config = load_config("synthetic_sft")
    if _SFT_STEPS.value:
        sft_config.train.num_steps = _SFT_STEPS.value
        sft_config.train.checkpoint_every = _SFT_STEPS.value
    sft_dir = os.path.join(workdir, "sft")
    print(f"[table] SFT -> {sft_dir}", flush=True)
    sft_results = train.train_and_evaluate(sft_config, sft_dir)

    runs: dict[str, list[dict]] = {n: [] for n in losses}
    for seed in range(_SEEDS.value):
        for name in losses:
            c = load_config("synthetic_dpo")
            c.po.loss = name
            c.po.beta = betas[name]
            c.po.sft_workdir = sft_dir
            c.po.pairs.seed = seed
            c.train.seed = seed
            c.train.num_steps = _STEPS.value
            c.train.checkpoint_every = _STEPS.value
            wd = os.path.join(workdir, "runs", f"{name}_s{seed}")
            t0 = time.perf_counter()
            res = train.train_and_evaluate(c, wd)
            runs[name].append(res)
            print(f"[table] {name} seed {seed}: true_reward={res['true_reward']:.3f} kl={res['kl_to_ref']:.2f} "
                  f"length={res['mean_length']:.2f} win={res['win_rate_vs_ref']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s, total {(time.perf_counter() - t_start) / 60:.1f} min)",
                  flush=True)

    rows = summarise(runs, sft_results)
    best = float(sft_results["best_reward"])
    params = ", ".join(f"{n}: beta={betas[n]:g}" for n in losses)
    header = (f"Synthetic language, {_SEEDS.value} seed(s), {_STEPS.value} steps of batch 64 pairs from "
              f"{c.po.pairs.num_pairs} SFT pairs; best possible reward {best:g}. {params}; "
              f"rpo alpha={c.po.alpha:g}, simpo gamma={c.po.gamma:g}, orpo lambda={c.po.lambda_:g}.")
    md = markdown(rows, header)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(md)
    out = {"rows": rows, "runs": runs, "betas": {n: betas[n] for n in losses}, "sft": sft_results,
           "seeds": _SEEDS.value, "steps": _STEPS.value, "minutes": (time.perf_counter() - t_start) / 60}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True, default=float)
    plot_frontier(os.path.join(workdir, "frontier.png"), runs, best)
    print(md)
    print(f"[table] wrote {workdir}/table.md, table.json, frontier.png in {out['minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    app.run(main)
