"""MaPO (arXiv 2406.06424) on a trained GMM diffusion model with a known half-plane reward.

    python -m experiments.prepare --config ml_collections_configs/gmm_mapo.py --workdir runs/gmm_mapo
    python -m experiments.run --config ml_collections_configs/gmm_mapo.py --workdir runs/gmm_mapo

Reference-free: the loss is err_w - beta * log sigmoid(T [h(s err_w) - h(s err_l)]), h(u) = u/(e^u - 1)
(public mapo-t2i code; beta = 0.1, s = `dpo.snr_value` = 0.5, T = `dpo.margin_scale` = 1000). The
reference score run (initial policy, perceptual encoder, and the baseline of the evaluation) and the
preference pairs are shared with gmm_diffusion_dpo.py: see that file for `dpo.reference`, the reward
and the pairs. `--config.dpo.space=perceptual` measures the errors in the reference network's features.
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_diffusion_dpo")
    c.dpo.method = "mapo"
    c.dpo.beta = 0.1  # beta_mapo of the public code
    return c
