"""Table: every preference loss and KTO on the known-reward synthetic language (true reward, KL,
length, win rate).

    python -m experiments.tables.preference --workdir runs/table_preference [--seeds 3] \
        [--losses dpo,ipo,...,cpo,kto] [--steps 500] [--sweep dpo=0.1:0.5,orpo=0.1:1]

1. Trains the SFT policy (ml_collections_configs/synthetic_sft.py) into DIR/sft (reused when done).
2. For each seed s: samples preference pairs from the SFT policy (pairs seed s, Bradley-Terry labels
   on the true reward; a local TFDS dataset under DIR/sft/preference_data) and fine-tunes the SFT
   policy with every loss at the strengths of its regulariser in `SWEEP` (beta, or lambda_ for orpo;
   ml_collections_configs/synthetic_dpo.py, training seed s; `kto`: synthetic_kto.py on the same
   pairs, unpaired; the on-policy `grpo`, `rloo`, `online_dpo`: their configs, sampling their own
   responses, seed s) into DIR/runs/<loss>_<param><value>_s<seed>. Finished runs are reused, so an
   interrupted table resumes.
3. Writes DIR/table.md, DIR/table.json (per-seed results and means) and DIR/frontier.png (true
   reward against KL(policy || SFT), one point per run, losses coloured).

Columns (mean +- std over seeds, responses sampled at temperature 1 on the 146 held-out prompts,
8 per prompt): true reward (the best possible is 2.7), KL to the SFT reference (nats per response,
Monte-Carlo), mean length (words; the optimum is 3), win rate against the SFT policy's responses
(ties 1/2), fraction of optimal responses, and the implicit-reward accuracy on training pairs and on
pairs of held-out prompts. About 20 s per offline run and 50 s per on-policy run on one CPU core:
the default (31 settings x 3 seeds) is about 40 minutes.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from experiments.tables.common import train_row
from fdistill.configs import load as load_config

# (the pairwise losses of fdistill.objectives.preference, then KTO, objective 'kto')
# loss -> (swept parameter, values); the other parameters are synthetic_dpo.py's defaults. Larger
# beta = stronger pull to the reference. The length-normalised losses compare per-token log-ratios
# (about 1/7 of the summed ones here), hence their larger beta; orpo has no reference and its beta
# only scales the logged rewards, so its odds-ratio weight lambda_ is swept instead.
# TRL's other DPOTrainer losses, CPO, KTO and online DPO run at DPO's beta 0.1 only, GRPO at
# DeepSeekMath's 0.04 (the weight of its k3 KL estimate), RLOO at 0.05 (its reward's KL penalty);
# `--sweep` adds values.
SWEEP = {"dpo": ("beta", (0.1, 0.5)), "cdpo": ("beta", (0.1, 0.5)), "ipo": ("beta", (0.1, 0.5)),
         "hinge": ("beta", (0.1, 0.5)), "ln_dpo": ("beta", (2.0, 10.0)), "simpo": ("beta", (2.0, 10.0)),
         "rpo": ("beta", (0.1, 0.5)), "orpo": ("lambda_", (0.1, 1.0)),
         **{n: ("beta", (0.1,)) for n in ("robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                                           "aot_unpaired", "apo_zero", "apo_down", "discopop", "cpo", "kto",
                                           "online_dpo")},
         "grpo": ("beta", (0.04,)), "rloo": ("beta", (0.05,))}
# rows that are objectives of their own (a config each); every other row is synthetic_dpo.py with po.loss
METHOD_CONFIGS = {"kto": "synthetic_kto", "grpo": "synthetic_grpo", "rloo": "synthetic_rloo",
                  "online_dpo": "synthetic_online_dpo"}
DEFAULT_LOSSES = ",".join(SWEEP)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the SFT run, the PO runs and the table.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per setting (pairs and training order).")
_LOSSES = flags.DEFINE_string("losses", DEFAULT_LOSSES, "Comma-separated preference losses.")
_STEPS = flags.DEFINE_integer("steps", 500, "Preference-optimisation steps per run.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 0, "SFT steps (0: the synthetic_sft.py default).")
_SWEEP = flags.DEFINE_string("sweep", "", "Overrides of the swept values, e.g. 'dpo=0.1:0.2:0.5,orpo=0.5'.")
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


def parse_sweep(text: str, losses: list[str]) -> dict[str, tuple[str, tuple[float, ...]]]:
    unknown = [n for n in losses if n not in SWEEP]
    if unknown:
        raise ValueError(f"--losses has unknown loss(es) {unknown}; allowed: {sorted(SWEEP)}")
    sweep = dict(SWEEP)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, values = item.partition("=")
        if name not in SWEEP or not values:
            raise ValueError(f"--sweep entry {item!r} must be <loss>=<v1>:<v2>... with loss in {sorted(SWEEP)}")
        sweep[name] = (SWEEP[name][0], tuple(float(v) for v in values.split(":")))
    return {n: sweep[n] for n in losses}


def settings(sweep) -> list[tuple[str, str, str, float]]:
    """(row name, loss, parameter, value) for every swept setting."""
    return [(f"{loss} ({param}={v:g})", loss, param, v) for loss, (param, values) in sweep.items() for v in values]


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

    fig, ax = plt.subplots(figsize=(9.0, 6.0))
    ref = [r["ref/true_reward"] for rs in runs.values() for r in rs]
    ax.scatter([0.0], [np.mean(ref)], marker="*", s=180, color="k", label="SFT (reference)", zorder=3)
    losses = sorted({name.split(" ")[0] for name in runs}, key=list(SWEEP).index)
    markers = "osD^v<>p"
    colours = plt.get_cmap("tab20")
    for name, rs in runs.items():
        loss = name.split(" ")[0]
        i, j = losses.index(loss), [n for n in runs if n.split(" ")[0] == loss].index(name)
        kl = [r["kl_to_ref"] for r in rs]
        tr = [r["true_reward"] for r in rs]
        ax.scatter(kl, tr, color=colours(i % 20), marker=markers[(j + 2 * (i // 20)) % len(markers)], alpha=0.85,
                   label=f"{name}, length {np.mean([r['mean_length'] for r in rs]):.1f}")
    ax.axhline(best, color="gray", ls="--", lw=1, label=f"best possible ({best:g})")
    ax.set(xlabel="KL(policy || SFT) [nats / response]", ylabel="true reward (held-out prompts)",
           title="Reward vs KL on the synthetic language")
    ax.legend(fontsize=5.5, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=2)
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

    workdir = os.path.abspath(_WORKDIR.value)
    losses = [n.strip() for n in _LOSSES.value.split(",") if n.strip()]
    sweep = parse_sweep(_SWEEP.value, losses)
    t_start = time.perf_counter()

    sft_config = load_config("synthetic_sft")
    if _SFT_STEPS.value:
        sft_config.train.num_steps = _SFT_STEPS.value
        sft_config.train.checkpoint_every = _SFT_STEPS.value
    sft_dir = os.path.join(workdir, "sft")
    print(f"[table] SFT -> {sft_dir}", flush=True)
    sft_results = train_row(sft_config, sft_dir, "sft")

    rows_spec = settings(sweep)
    runs: dict[str, list[dict]] = {row: [] for row, *_ in rows_spec}
    for seed in range(_SEEDS.value):
        for row, name, param, value in rows_spec:
            c = load_config(METHOD_CONFIGS.get(name, "synthetic_dpo"))
            if name not in METHOD_CONFIGS:
                c.po.loss = name
            c.po[param] = value
            c.po.sft_workdir = sft_dir
            c.po.pairs.seed = seed
            c.train.seed = seed
            c.train.num_steps = _STEPS.value
            c.train.checkpoint_every = _STEPS.value
            wd = os.path.join(workdir, "runs", f"{name}_{param}{value:g}_s{seed}")
            t0 = time.perf_counter()
            res = train_row(c, wd, f"{row} seed {seed}")
            runs[row].append(res)
            print(f"[table] {row} seed {seed}: true_reward={res['true_reward']:.3f} kl={res['kl_to_ref']:.2f} "
                  f"length={res['mean_length']:.2f} win={res['win_rate_vs_ref']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s, total {(time.perf_counter() - t_start) / 60:.1f} min)",
                  flush=True)

    rows = summarise(runs, sft_results)
    c = load_config("synthetic_dpo")  # the defaults of the parameters that are not swept
    best = float(sft_results["best_reward"])
    header = (f"Synthetic language, {_SEEDS.value} seed(s) per row, {_STEPS.value} steps of batch 64 pairs (kto: 128 unpaired examples; grpo, rloo: 16 prompts x 8 own samples; online_dpo: 64 own pairs) from "
              f"{c.po.pairs.num_pairs} SFT pairs per seed; best possible reward {best:g}, best length 3 words. "
              f"rpo alpha={c.po.alpha:g}, simpo gamma={c.po.gamma:g}, orpo beta={c.po.beta:g} (logging only).")
    md = markdown(rows, header)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(md)
    out = {"rows": rows, "runs": runs, "sweep": {n: list(v[1]) for n, v in sweep.items()}, "sft": sft_results,
           "seeds": _SEEDS.value, "steps": _STEPS.value, "minutes": (time.perf_counter() - t_start) / 60}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True, default=float)
    plot_frontier(os.path.join(workdir, "frontier.png"), runs, best)
    print(md)
    print(f"[table] wrote {workdir}/table.md, table.json, frontier.png in {out['minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    app.run(main)
