"""Table: decoding-time alignment on the synthetic language. Transfer Q* (arXiv 2405.20495) against
best-of-N and plain sampling at equal compute, with the KL to the SFT policy.

    python -m experiments.tables.decoding --workdir runs/table_decoding [--alphas 1,3,10] [--top_k 4] \
        [--num_rollouts 1] [--samples_per_prompt 8] [--seeds 3]

1. Trains (or reuses) the SFT policy (synthetic_sft.py) in DIR/sft and the baseline aligned model of
   Transfer Q*'s direct transfer, DPO (synthetic_dpo.py, beta 0.1: aligned with Bradley-Terry labels
   of the true reward, the target reward here) in DIR/dpo.
2. Decodes `samples_per_prompt` responses on each of the 146 held-out prompts with: the SFT policy;
   the DPO policy; Transfer Q* with alpha in `--alphas` (top-k candidates of the SFT policy, Q* from
   `num_rollouts` DPO continuations each scored by the true reward; `fdistill.decoding`); and
   best-of-N of the SFT policy with N = the Transfer Q* row's tokens generated per response / the
   SFT's (equal compute, counted in generated tokens).
3. Writes DIR/table.md and DIR/table.json: true reward, KL to SFT (nats per response: Monte-Carlo
   for DPO, exact per-step sums for Transfer Q*, the analytic bound log N - (N-1)/N for best-of-N),
   length (words), tokens generated per response, win rate against SFT samples; mean +- std over
   decoding seeds.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.tables.common import train_row
from fdistill import decoding, runs
from fdistill.configs import load as load_config
from fdistill.data import preference as prefdata
from fdistill.evaluation import preference as prefeval
from fdistill.objectives import language

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the SFT and DPO runs and the table.")
_ALPHAS = flags.DEFINE_list("alphas", ["1", "3", "10"], "Transfer Q* alphas (1 / beta).")
_TOP_K = flags.DEFINE_integer("top_k", 4, "Transfer Q*: candidates per step (top-k of the SFT policy).")
_ROLLOUTS = flags.DEFINE_integer("num_rollouts", 1, "Transfer Q*: baseline continuations per candidate.")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 8, "Responses per held-out prompt.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Decoding seeds.")
flags.mark_flag_as_required("workdir")

COLUMNS = [("true reward", "true_reward", "{:.3f}"), ("KL to SFT", "kl_to_sft", "{:.2f}"),
           ("length", "mean_length", "{:.2f}"), ("tokens generated / response", "tokens_per_response", "{:.1f}"),
           ("win rate vs SFT", "win_rate_vs_sft", "{:.3f}"), ("N (best-of-N)", "N", "{:.1f}")]


def response_lengths(tokens) -> np.ndarray:
    """Generated tokens per sequence (response words + EOS)."""
    return np.sum(np.asarray(tokens)[:, prefdata.PROMPT_LEN:] != prefdata.PAD, axis=1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = os.path.abspath(_WORKDIR.value)
    alphas = [float(a) for a in _ALPHAS.value]
    t0 = time.perf_counter()
    sft_dir, dpo_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "dpo")
    train_row(load_config("synthetic_sft"), sft_dir, "sft")
    dpo_config = load_config("synthetic_dpo")
    dpo_config.po.sft_workdir = sft_dir
    train_row(dpo_config, dpo_dir, "dpo")

    sft_run = runs.open_run(sft_dir, "sft", ("sft",), "synthetic_sft")
    dpo_run = runs.open_run(dpo_dir, "dpo", ("po",), "synthetic_dpo")
    task = prefdata.SyntheticLanguage(sft_run.config.task)
    model = language.build_model(sft_run.config.model, task)
    policy = language.LMPolicy(model, task)
    sft, dpo = runs.restore_params(sft_run), runs.restore_params(dpo_run)
    prompts = np.repeat(task.heldout_prompts, _SAMPLES.value, axis=0)
    p = jnp.asarray(prompts)
    tq = jax.jit(lambda key, alpha: decoding.transfer_q_decode(model, sft, dpo, task, p, key, alpha=alpha,
                                                               top_k=_TOP_K.value, num_rollouts=_ROLLOUTS.value))

    per_seed: dict[str, list[dict]] = {}
    for seed in range(_SEEDS.value):
        key = jax.random.PRNGKey(seed)
        sft_tokens, sft_logp = policy.sample(sft, prompts, jax.random.fold_in(key, 0))
        _, sft_r = prefeval.response_metrics(task, prompts, sft_tokens)
        sft_cost = float(np.mean(response_lengths(sft_tokens)))

        def row(name, tokens, kl, cost, N=1):
            m, r = prefeval.response_metrics(task, prompts, np.asarray(tokens))
            out = {"true_reward": m["true_reward"], "mean_length": m["mean_length"], "kl_to_sft": float(kl),
                   "tokens_per_response": float(cost), "win_rate_vs_sft": prefeval.win_rate(r, sft_r), "N": float(N)}
            per_seed.setdefault(name, []).append(out)
            print(f"[decoding] seed {seed} {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in out.items()), flush=True)

        other, _ = policy.sample(sft, prompts, jax.random.fold_in(key, 1))  # an independent SFT sample
        row("SFT sampling", other, 0.0, np.mean(response_lengths(other)))
        dpo_tokens, dpo_logp = policy.sample(dpo, prompts, jax.random.fold_in(key, 2))
        row("DPO sampling (baseline model)", dpo_tokens,
            prefeval.kl_estimate(dpo_logp, policy.score(sft, dpo_tokens))[0], np.mean(response_lengths(dpo_tokens)))
        for alpha in alphas:
            tokens, kl, spent = tq(jax.random.fold_in(key, 3), jnp.float32(alpha))
            cost = float(np.mean(spent))
            row(f"Transfer Q* (alpha={alpha:g}, k={_TOP_K.value}, rollouts={_ROLLOUTS.value})", tokens,
                np.mean(np.asarray(kl)), cost)
            n = max(1, int(round(cost / sft_cost)))
            best, spent_bon = decoding.best_of_n(model, sft, task, p, jax.random.fold_in(key, 4), n)
            row(f"best-of-N SFT (compute of alpha={alpha:g})", best, decoding.best_of_n_kl_bound(n),
                np.mean(np.asarray(spent_bon)), N=n)

    rows = {name: {k: [float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))] for k in rs[0]}
            for name, rs in per_seed.items()}
    lines = [f"Synthetic language, {len(prompts)} responses per row (146 held-out prompts x {_SAMPLES.value}), "
             f"mean +- std over {_SEEDS.value} decoding seeds. Baseline model: DPO (beta 0.1) on the SFT pairs. "
             "KL: Monte-Carlo (DPO), exact per-step sum (Transfer Q*), analytic bound (best-of-N).", "",
             "| decoding | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, row_stats in rows.items():
        cells = [fmt.format(row_stats[k][0]) + (f" ± {fmt.format(row_stats[k][1])}" if _SEEDS.value > 1 else "")
                 for _, k, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump({"rows": rows, "per_seed": per_seed, "alphas": alphas, "top_k": _TOP_K.value,
                   "num_rollouts": _ROLLOUTS.value, "minutes": (time.perf_counter() - t0) / 60}, f, indent=2)
    print(md)
    print(f"[decoding] wrote {workdir}/table.md, table.json in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    app.run(main)
