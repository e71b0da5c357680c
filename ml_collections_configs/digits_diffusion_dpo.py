"""Diffusion-DPO (arXiv 2311.12908) on the 8x8 digits U-Net with the in-project classifier as reward.

    python -m experiments.prepare --config ml_collections_configs/digits_diffusion_dpo.py --workdir runs/digits_diffusion_dpo
    python -m experiments.run --config ml_collections_configs/digits_diffusion_dpo.py --workdir runs/digits_diffusion_dpo

Reward r(x) = log p_clf(target_class | x) of the cached digits classifier (fdistill.evaluation.
digits_classifier); the preferred set is the samples it classifies as `target_class` (default 3).
The reference is the finished score run named by `dpo.reference` (default runs/digits_score, made
by `python -m experiments.run --config ml_collections_configs/digits_score.py --workdir
runs/digits_score`, ~20 min on 2 CPU cores; `experiments.prepare` trains it when missing). Pairs:
2 x 2048 reference samples labelled by Bradley-Terry (temperature 1 on the log-probability
scale), stored under <reference>/preference_pairs/. `--config.dpo.space=perceptual` measures the
errors in the reference U-Net's bottleneck features. results.json: reward_mean, preferred_frac,
mmd_to_reference, sample/* (fd_digits, precision, recall, class_entropy) and reference/*.
"""
from fdistill import configs


def get_config():
    c = configs.base("diffusion_po", data="digits", model="unet")  # Diffusion-DPO beta 100
    c.dpo.reference = "runs/digits_score"
    c.reward.kind = "classifier"
    c.reward.target_class = 3
    c.pairs.num_pairs = 2048
    c.pairs.temperature = 1.0
    c.train.num_steps = 500
    c.train.batch_size = 64
    c.train.learning_rate = 1e-4
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.eval.num_samples = 1024
    c.eval.chunk = 512
    return c
