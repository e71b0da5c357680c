"""Study: reward over-optimisation against a learned reward model (RPO's claim, arXiv 2405.16436:
the SFT term of RPO mitigates it), with the true reward known.

    python -m experiments.studies.overoptimisation --workdir runs/overopt [--seeds 3] [--steps 500] \
        [--methods dpo,rpo,grpo] [--rm_pairs 512]

1. Trains the SFT policy (synthetic_sft.py) in DIR/sft and a Bradley-Terry reward model on
   `--rm_pairs` of its preference pairs (synthetic_reward_model.py) in DIR/reward_model; its
   held-out accuracy and correlation with the true reward are in its results.json.
2. For each method and seed, optimises the SFT policy against the *learned* reward
   (`po.reward_model`): dpo and rpo on the SFT pairs relabelled by Bradley-Terry draws on the
   learned reward, grpo with the learned reward of its own samples. Every `--steps / 10` steps the
   run evaluates its policy on held-out prompts: true reward, learned (proxy) reward, KL to SFT.
3. Writes DIR/overoptimisation.md (per method: the SFT's true reward, the peak and final true reward
   along training, the final proxy reward and KL; mean +- std over seeds) and
   DIR/overoptimisation.png (true and proxy reward, relative to the SFT policy, against KL to SFT:
   the over-optimisation curves, one line per run).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from experiments.tables.common import check_choices, eval_curve, train_row
from fdistill.configs import load as load_config

METHODS = {"dpo": ("synthetic_dpo", {"loss": "dpo"}), "rpo": ("synthetic_dpo", {"loss": "rpo"}),
           "grpo": ("synthetic_grpo", {})}
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the SFT run, the reward model and the runs.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method (training order and, for the pairs' relabelling, draws).")
_STEPS = flags.DEFINE_integer("steps", 500, "Optimisation steps per run.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods; allowed: {list(METHODS)}.")
_RM_PAIRS = flags.DEFINE_integer("rm_pairs", 512, "Preference pairs the reward model learns from.")
flags.mark_flag_as_required("workdir")


def plot(path: str, curves: dict[str, list[list[dict]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), squeeze=False, sharey=True)
    for ax, (method, runs) in zip(axes[0], curves.items()):
        for i, rows in enumerate(runs):
            kl = [0.0] + [r["kl_to_ref"] for r in rows]
            true = [0.0] + [r["true_reward"] - r["ref/true_reward"] for r in rows]
            proxy0 = rows[0]["ref_proxy_reward"]
            proxy = [0.0] + [r["proxy_reward"] - proxy0 for r in rows]
            ax.plot(kl, true, "-o", ms=3, color="C0", alpha=0.8, label="true reward" if i == 0 else None)
            ax.plot(kl, proxy, "--s", ms=3, color="C3", alpha=0.8, label="learned (proxy) reward" if i == 0 else None)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set(title=f"{method} against the learned reward", xlabel="KL(policy || SFT) [nats / response]")
    axes[0][0].set_ylabel("reward - SFT's")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_choices("methods", _METHODS.value, METHODS)
    import jax

    from fdistill import runs
    from fdistill.objectives import reward_model

    workdir = os.path.abspath(_WORKDIR.value)
    t0 = time.perf_counter()
    sft_dir, rm_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "reward_model")
    train_row(load_config("synthetic_sft"), sft_dir, "sft")
    rm_config = load_config("synthetic_reward_model")
    rm_config.po.sft_workdir = sft_dir
    rm_config.po.pairs.num_pairs = _RM_PAIRS.value
    rm_results = train_row(rm_config, rm_dir, "reward_model")
    fn, rm_params = reward_model.load(runs.open_run(rm_dir, "reward_model", ("reward_model",), "synthetic_reward_model"))
    proxy = jax.jit(lambda tokens: fn(rm_params, tokens))

    curves: dict[str, list[list[dict]]] = {}
    for method in _METHODS.value:
        name, po = METHODS[method]
        for seed in range(_SEEDS.value):
            c = load_config(name)
            for k, v in po.items():
                c.po[k] = v
            c.po.sft_workdir, c.po.reward_model = sft_dir, rm_dir
            c.po.pairs.seed, c.train.seed = seed, seed
            c.train.num_steps = c.train.checkpoint_every = _STEPS.value
            c.train.eval_every = max(_STEPS.value // 10, 1)
            wd = os.path.join(workdir, "runs", f"{method}_s{seed}")
            print(f"[overopt] {method} seed {seed} -> {wd}", flush=True)
            train_row(c, wd, f"{method} seed {seed}")
            curves.setdefault(method, []).append(eval_curve(wd, "true_reward"))

    sft_proxy = sft_proxy_reward(sft_dir, proxy)
    for runs in curves.values():
        for rows in runs:
            for r in rows:
                r["ref_proxy_reward"] = sft_proxy
    summary = {}
    for method, runs in curves.items():
        stat = lambda f: [float(np.mean([f(rows) for rows in runs])), float(np.std([f(rows) for rows in runs]))]
        summary[method] = {
            "sft_true_reward": stat(lambda rows: rows[0]["ref/true_reward"]),
            "peak_true_reward": stat(lambda rows: max(r["true_reward"] for r in rows)),
            "peak_step": stat(lambda rows: rows[int(np.argmax([r["true_reward"] for r in rows]))]["step"]),
            "final_true_reward": stat(lambda rows: rows[-1]["true_reward"]),
            "final_proxy_gain": stat(lambda rows: rows[-1]["proxy_reward"] - sft_proxy),
            "final_kl": stat(lambda rows: rows[-1]["kl_to_ref"]),
        }
    cols = [("SFT true reward", "sft_true_reward", "{:.3f}"), ("peak true reward", "peak_true_reward", "{:.3f}"),
            ("at step", "peak_step", "{:.0f}"), ("final true reward", "final_true_reward", "{:.3f}"),
            ("final proxy gain", "final_proxy_gain", "{:.2f}"), ("final KL", "final_kl", "{:.2f}")]
    lines = [f"Over-optimisation against a learned reward model ({_RM_PAIRS.value} pairs; held-out accuracy "
             f"{rm_results['accuracy']:.3f}, correlation with the true reward {rm_results['true_reward_corr']:.3f}); "
             f"{_STEPS.value} steps, {_SEEDS.value} seed(s), mean +- std. Proxy gain: the learned reward of the "
             f"policy's held-out samples minus the SFT policy's ({sft_proxy:.3f}).", "",
             "| method | " + " | ".join(h for h, _, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for method, s in summary.items():
        lines.append(f"| {method} | " + " | ".join(f.format(s[k][0]) + (f" ± {f.format(s[k][1])}" if _SEEDS.value > 1 else "")
                                                  for _, k, f in cols) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "overoptimisation.md"), "w") as f:
        f.write(md)
    with open(os.path.join(workdir, "overoptimisation.json"), "w") as f:
        json.dump({"summary": summary, "curves": curves, "reward_model": rm_results, "sft_proxy_reward": sft_proxy},
                  f, indent=2, default=float)
    plot(os.path.join(workdir, "overoptimisation.png"), curves)
    print(md)
    print(f"[overopt] wrote {workdir}/overoptimisation.md, .json, .png in {(time.perf_counter() - t0) / 60:.1f} min",
          flush=True)


def sft_proxy_reward(sft_dir: str, proxy) -> float:
    """The learned reward of the SFT policy's samples on the held-out prompts (8 per prompt, the
    evaluation's protocol), the origin of the proxy curves."""
    import jax
    import jax.numpy as jnp

    from fdistill import runs
    from fdistill.data import preference as prefdata
    from fdistill.objectives import language

    run = runs.open_run(sft_dir, "sft", ("sft",), "synthetic_sft")
    task = prefdata.SyntheticLanguage(run.config.task)
    policy = language.LMPolicy(language.build_model(run.config.model, task), task)
    prompts = np.repeat(task.heldout_prompts, 8, axis=0)
    tokens, _ = policy.sample(runs.restore_params(run), prompts, jax.random.PRNGKey(0))
    return float(np.mean(np.asarray(proxy(jnp.asarray(tokens)))))


if __name__ == "__main__":
    app.run(main)
