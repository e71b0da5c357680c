"""Diffusion-DPO (arXiv 2311.12908) on a trained GMM diffusion model with a known half-plane reward.

    python -m experiments.prepare --config ml_collections_configs/gmm_diffusion_dpo.py --workdir runs/gmm_diffusion_dpo
    python -m experiments.run --config ml_collections_configs/gmm_diffusion_dpo.py --workdir runs/gmm_diffusion_dpo

The reference (and initial policy) is the finished score run named by `dpo.reference` (default
runs/gmm_score, i.e. `python -m experiments.run --config ml_collections_configs/gmm_score.py
--workdir runs/gmm_score`; `experiments.prepare` trains it when missing). Preference pairs are
2 x `pairs.num_pairs` reference samples, matched at random and labelled by Bradley-Terry on the
reward r(x) = n . x, n = (cos 22.5 deg, sin 22.5 deg) (4 of the 8 ring modes preferred); they are
stored as a local TFDS dataset under <reference>/preference_pairs/. Options:
`--config.dpo.beta=...`, `--config.dpo.method=ipo` (any loss of fdistill/objectives/preference.py
on the implicit log-likelihoods -err/2), `--config.dpo.space=perceptual` (errors in the reference
network's feature space, arXiv 2406.17636), `--config.reward.kind=mode_subset --config.reward.modes=(0,1)`.
results.json: reward_mean, preferred_frac, reward_gain (vs the reference), mmd_to_reference,
sample/* (mode coverage, weight TV, high-quality fraction, MMD to the data) and reference/*.
"""
from fdistill import configs


def get_config():
    c = configs.base("diffusion_po", data="gmm", model="mlp")  # Diffusion-DPO beta 100 (public code's scale)
    c.dpo.reference = "runs/gmm_score"
    c.train.batch_size = 256  # pairs per step
    c.train.learning_rate = 1e-4
    c.train.checkpoint_every = 500
    return c
