"""Knowledge distillation (Luhman & Luhman 2021, arXiv 2101.02388) of the digits U-Net teacher.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score
    python -m experiments.run --config ml_collections_configs/digits_kd.py --workdir runs/digits_kd

The one-step student (the teacher's U-Net, started from its EMA weights) regresses the teacher's
18-step Heun endpoint (35 NFE, computed in the step) from the same noise. `digits_fdistill.py`'s
data, batch and evaluation; 800 updates. A `digits_flow.py` run is a teacher too
(`--config.distill.teacher=<workdir>`).
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_fdistill")
    c.objective = "kd"
    c.distill.latent_dim = 0  # the student maps the teacher's own starting noise
    c.distill.lr_gen = 1e-4
    c.train.ema_decay = 0.999
    return c
