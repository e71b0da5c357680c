"""Preference optimisation (DPO family) of the synthetic-language SFT policy, with a known reward.

    python -m experiments.prepare --config ml_collections_configs/synthetic_dpo.py --workdir runs/synthetic_dpo
    python -m experiments.run --config ml_collections_configs/synthetic_dpo.py --workdir runs/synthetic_dpo

The reference (and initial policy) is the finished SFT run named by `po.sft_workdir` (default
runs/synthetic_sft). `experiments.prepare` trains it there (ml_collections_configs/synthetic_sft.py
with this config's task and model, about a minute on a laptop CPU) unless it is already finished;
`python -m experiments.run --config ml_collections_configs/synthetic_sft.py --workdir runs/synthetic_sft`
does the same. Another loss on the same SFT run:

    python -m experiments.run --config ml_collections_configs/synthetic_dpo.py --workdir runs/ipo \
        --config.po.loss=ipo --config.po.beta=0.1

The preference data (two SFT samples per prompt, Bradley-Terry labels on the true reward) are built
once as a local TFDS dataset (ArrayRecord) in `po.data_dir` (default <sft workdir>/preference_data)
and reused. `po.loss`: any loss of fdistill/objectives/preference.py (dpo | cdpo | ipo | hinge |
ln_dpo | simpo | rpo | orpo | mapo and TRL's robust | exo_pair | nca_pair | bco_pair | sppo_hard |
aot | aot_unpaired | apo_zero | apo_down | discopop | cpo), with `po.beta` and
`po.label_smoothing` (cdpo, robust, exo_pair, aot*), `po.gamma` (simpo), `po.alpha` (rpo),
`po.lambda_` (orpo), `po.cpo_alpha` (cpo), `po.discopop_tau`, `po.nll_norm` (rpo, orpo, cpo:
'example' | 'batch'), `po.snr_value` / `po.margin_scale` (mapo). KTO: synthetic_kto.py.
`po.precompute_ref=True` computes the reference log-probs once; False recomputes them in the step.
`po.reference=init` skips the SFT run (random reference, demonstrator pairs; for benchmarks).
results.json: true_reward, kl_to_ref, mean_length, win_rate_vs_ref, optimal_frac, ref/* (the SFT
policy), rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} on training pairs
and heldout/* on pairs of held-out prompts.
"""
from fdistill import configs


def get_config():
    c = configs.base("po")  # DPO, beta 0.1; 4096 + 512 SFT pairs; task and model as synthetic_sft.py
    c.po.sft_workdir = "runs/synthetic_sft"
    c.train.num_steps = 500
    c.train.batch_size = 64  # pairs per step
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 20
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    return c
