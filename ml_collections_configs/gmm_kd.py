"""Knowledge distillation (Luhman & Luhman 2021, arXiv 2101.02388) of the analytic mixture teacher.

    python -m experiments.run --config ml_collections_configs/gmm_kd.py --workdir runs/gmm_kd

The one-step generator regresses the teacher's 18-step Heun endpoint (35 NFE) from the same noise
(the README's "Adding an objective" example). Same mixture and network as `gmm_fdistill.py`; 2000 updates.
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_fdistill")
    c.objective = "kd"
    c.distill.lr_gen = 1e-3
    configs.override(c, configs.DATA_SHAPED_LATENT)  # the student maps the teacher's own starting noise
    c.train.num_steps = 2000
    c.train.log_every = 250
    c.train.checkpoint_every = 1000
    c.eval.num_steps = 18  # the teacher's ODE: 18 Heun steps (NFE 35), for the targets and the reference row
    return c
