"""MaPO (arXiv 2406.06424) on the 8x8 digits U-Net with the in-project classifier as reward.

    python -m experiments.prepare --config ml_collections_configs/digits_mapo.py --workdir runs/digits_mapo
    python -m experiments.run --config ml_collections_configs/digits_mapo.py --workdir runs/digits_mapo

Same reference, reward and pairs as digits_diffusion_dpo.py (see there); the loss is the public MaPO
code's err_w - beta log sigmoid(T [h(s err_w) - h(s err_l)]) with beta = 0.01 (0.1 is the public default,
which hacked the reward on the GMM table).
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_diffusion_dpo")
    c.dpo.method = "mapo"
    c.dpo.beta = 0.01
    return c
