"""VSD / DMD without regression (arXiv 2305.16213, 2311.18828) as a special case of f-distill:
reverse KL (h = 1) and no GAN term, so no discriminator is trained.

    python -m experiments.run --config ml_collections_configs/gmm_vsd.py --workdir runs/gmm_vsd

Same problem, networks and schedule as `gmm_fdistill.py`: the generator follows the pure
distribution-matching (score-difference) gradient against an online fake score.
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_fdistill")
    c.distill.divergence = "rkl"
    c.distill.lambda_gan = 0.0
    return c
