"""DMD2 (arXiv 2405.14867) as a special case of f-distill: reverse KL (h = 1) plus the GAN term.

    python -m experiments.run --config ml_collections_configs/gmm_dmd2.py --workdir runs/gmm_dmd2

Same problem, networks and schedule as `gmm_fdistill.py`; only the divergence changes: the
generator follows the DMD distribution-matching gradient (D_fake - D_real) / mean|x - D_real| and
the non-saturating GAN loss of a classifier head on the fake score's features, with five critic
updates per generator update (two time-scale rule).
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_fdistill")
    c.distill.divergence = "rkl"  # lambda_gan, noise levels, latent and schedule as gmm_fdistill (the study's)
    return c
