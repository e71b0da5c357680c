"""Diffusion-DPO (arXiv 2311.12908) on the 8x8 digits U-Net with the in-project classifier as reward.

    python -m experiments.run --config ml_collections_configs/digits_diffusion_dpo.py --workdir runs/digits_diffusion_dpo

Reward r(x) = log p_clf(target_class | x) of the cached digits classifier (fdistill.evaluation.
digits_classifier); the preferred set is the samples it classifies as `target_class` (default 3).
The reference is `--config.dpo.reference=<workdir of a digits_score run>`; left empty,
ml_collections_configs/digits_score.py is trained once (~20 min on 2 CPU cores) into
~/.cache/fdistill/references/score-<hash> and reused. Pairs: 2 x 2048 reference samples labelled by
Bradley-Terry (temperature 1 on the log-probability scale), stored under <reference>/preference_pairs/.
`--config.dpo.space=perceptual` measures the errors in the reference U-Net's bottleneck features.
results.json: reward_mean, preferred_frac, mmd_to_reference, sample/* (fd_digits, precision, recall,
class_entropy) and reference/*.
"""
import importlib.util
import os


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_fdistill_{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _load("gmm_diffusion_dpo")
    c.dpo.teacher = _load("digits_score")
    c.dpo.beta = 100.0

    c.reward = c.reward.__class__()
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
    c.eval.num_steps = 18
    c.eval.chunk = 512
    return c
