"""Continuous-time consistency distillation (sCD, TrigFlow; arXiv 2410.11081) of the digits U-Net teacher.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score
    python -m experiments.run --config ml_collections_configs/digits_scm.py --workdir runs/digits_scm

`gmm_scm.py`'s objective (the tangent of f along the teacher's PF-ODE is one `jax.jvp`) with the
digits teacher's U-Net: the student starts from the teacher's EMA weights and keeps its EDM time
conditioning (`scm_time_conditioning = 'edm'`). `digits_cd.py`'s batch, learning rate and EMA; tangent
warmup over the first 20% of the run. Unlike `gmm_scm.py` it keeps the paper's tangent normalisation
g / (||g|| + 0.1): measured at 2000 updates (1 / 2 / 4-step fd_digits), with it 71.5 / 23.0 / 10.2, without
it 226.9 / 106.0 / 101.0, with a final loss of 75 against 0.015 (likely the EDM time embedding
ln(sigma_d tan t) / 4, whose derivative 1 / (2 sin(2t)) blows up at both ends of [0, pi/2]).
The adaptive weight stays off. Evaluated with 1, 2 and 4 steps.
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_cd")
    c.objective = "scm"
    c.distill.cm_p_mean = -1.0
    c.distill.cm_p_std = 1.4
    c.distill.scm_time_conditioning = "edm"
    c.distill.scm_tangent_warmup = 400
    c.distill.scm_tangent_norm = True
    c.distill.scm_adaptive_weight = False
    return c
