"""Preference optimisation (DPO family) of the synthetic-language SFT policy, with a known reward.

    python -m experiments.run --config ml_collections_configs/synthetic_dpo.py --workdir runs/synthetic_dpo

Runnable by itself: with `po.sft_workdir` empty, the SFT run described by `po.sft`
(ml_collections_configs/synthetic_sft.py) is trained first into `<po.sft_cache>/sft-<config hash>`
(default $FDISTILL_CACHE/sft or ~/.cache/fdistill/sft, about a minute on a laptop CPU) and reused by
every later run with the same SFT config. To use your own SFT run:

    python -m experiments.run --config ml_collections_configs/synthetic_sft.py --workdir runs/sft
    python -m experiments.run --config ml_collections_configs/synthetic_dpo.py --workdir runs/ipo \
        --config.po.sft_workdir=runs/sft --config.po.loss=ipo --config.po.beta=0.1

The preference data (two SFT samples per prompt, Bradley-Terry labels on the true reward) are built
once as a local TFDS dataset (ArrayRecord) in `po.data_dir` (default <sft workdir>/preference_data)
and reused. `po.loss`: dpo | cdpo | ipo | hinge | ln_dpo | simpo | rpo | orpo, with `po.beta` and
`po.label_smoothing` (cdpo), `po.gamma` (simpo), `po.alpha` (rpo), `po.lambda_` (orpo).
`po.precompute_ref=True` computes the reference log-probs once; False recomputes them in the step.
`po.reference='init'` skips the SFT run (random reference, demonstrator pairs; for benchmarks).
results.json: true_reward, kl_to_ref, mean_length, win_rate_vs_ref, optimal_frac, ref/* (the SFT
policy), rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} on training pairs
and heldout/* on pairs of held-out prompts.
"""
import importlib.util
import os

import ml_collections


def sft_config() -> ml_collections.ConfigDict:
    """ml_collections_configs/synthetic_sft.py: the reference trained when po.sft_workdir is empty."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_sft.py")
    spec = importlib.util.spec_from_file_location("_fdistill_synthetic_sft_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "po"

    c.po = ml_collections.ConfigDict()
    c.po.loss = "dpo"
    c.po.beta = 0.1
    c.po.label_smoothing = 0.1  # cdpo
    c.po.gamma = 0.5  # simpo target margin
    c.po.alpha = 1.0  # rpo: weight of the chosen response's length-normalised NLL
    c.po.lambda_ = 0.1  # orpo: weight of the odds-ratio term
    c.po.precompute_ref = True
    c.po.reference = "sft"  # sft | init
    c.po.init_seed = 0  # reference='init' only
    c.po.sft_workdir = ""  # a finished synthetic_sft run; '' = train/reuse po.sft
    c.po.sft_cache = ""  # '' = $FDISTILL_CACHE/sft or ~/.cache/fdistill/sft
    c.po.sft = sft_config()
    c.po.data_dir = ""  # '' = <sft workdir>/preference_data

    c.po.pairs = ml_collections.ConfigDict()
    c.po.pairs.num_pairs = 4096  # training pairs (training prompts)
    c.po.pairs.num_test_pairs = 512  # pairs on held-out prompts (heldout/* metrics)
    c.po.pairs.bt_temperature = 0.25  # P(a > b) = sigmoid((r(a) - r(b)) / bt_temperature)
    c.po.pairs.sample_temperature = 1.0  # SFT sampling temperature for the responses
    c.po.pairs.seed = 0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 500
    c.train.batch_size = 64  # pairs per step
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 20
    c.train.grad_clip = 1.0
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.0
    c.train.seed = 0
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.compute_dtype = "float32"

    c.eval = ml_collections.ConfigDict()
    c.eval.samples_per_prompt = 8  # x 146 held-out prompts
    c.eval.temperature = 1.0
    c.eval.num_pairs = 512  # first training / held-out pairs for the rewards/* metrics
    c.eval.use_ema = False
    c.eval.chunk = 1024
    return c
