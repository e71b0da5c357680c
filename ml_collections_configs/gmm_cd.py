"""Consistency distillation (arXiv 2303.01469, with iCT's sampling of levels and weights) of the
analytic mixture teacher.

    python -m experiments.run --config ml_collections_configs/gmm_cd.py --workdir runs/gmm_cd

The student f(x, sigma) maps a data point noised to s_{i+1} onto the consistency function at the
teacher's Heun step to s_i, on a fixed Karras grid of N = 40 levels (`cm_scales_min = max`). Same
imbalanced 8-mode ring as `gmm_fdistill.py`, a residual MLP of width 128. A finished score or flow run is a
teacher too: `--config.distill.teacher=<workdir>` (the student then starts from its weights).
Evaluated with 1 (the configured `num_student_steps`), 2 and 4 steps.
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_fdistill")
    c.objective = "cd"
    configs.override(c, configs.DATA_SHAPED_LATENT)  # f maps a noised data point
    c.distill.cm_scales_min = 40
    c.distill.cm_scales_max = 40
    c.distill.cm_loss = "l2"  # CD's squared distance (pseudo-Huber, iCT's choice for CT: 0.47 vs 0.52 hq at 4000 updates)
    c.model.width = 128
    c.distill.lr_gen = 1e-3
    c.train.lr_schedule = "cosine"
    c.train.ema_decay = 0.999  # samples use the EMA
    c.train.num_steps = 20000
    c.train.batch_size = 512
    return c
