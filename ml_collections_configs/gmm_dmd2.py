"""DMD2 (arXiv 2405.14867) as a special case of f-distill: reverse KL (h = 1) plus the GAN term.

    python -m experiments.run --config ml_collections_configs/gmm_dmd2.py --workdir runs/gmm_dmd2

Same problem, networks and schedule as `gmm_fdistill.py`; only the divergence changes: the
generator follows the DMD distribution-matching gradient (D_fake - D_real) / mean|x - D_real| and
the non-saturating GAN loss of a classifier head on the fake score's features, with five critic
updates per generator update (two time-scale rule).
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gmm_fdistill.py")
    spec = importlib.util.spec_from_file_location("gmm_fdistill_base", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.distill.divergence = "rkl"
    c.distill.lambda_gan = 1e-3
    return c
