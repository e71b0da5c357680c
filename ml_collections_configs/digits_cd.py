"""Consistency distillation (arXiv 2303.01469) of the digits U-Net teacher.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score
    python -m experiments.run --config ml_collections_configs/digits_cd.py --workdir runs/digits_cd

`gmm_cd.py`'s recipe (a fixed Karras grid of N = 40 levels, the teacher's Heun step between
neighbours, squared distance, iCT's level sampling and weights) with the digits teacher's U-Net:
the student starts from the teacher's EMA weights (`distill.teacher`, default runs/digits_score).
Batch 32, learning rate 1e-4 with a cosine decay, EMA 0.999. Evaluated with 1, 2 and 4 steps.
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_fdistill")
    c.objective = "cd"
    c.distill.latent_dim = 0
    c.distill.cm_scales_min = 40
    c.distill.cm_scales_max = 40
    c.distill.cm_loss = "l2"
    c.distill.lr_gen = 1e-4
    c.train.lr_schedule = "cosine"
    c.train.ema_decay = 0.999
    c.train.num_steps = 2000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 500
    return c
