"""Consistency tuning (ECT, arXiv 2406.14548) of the digits U-Net teacher: consistency training
(arXiv 2310.14189) started from a pretrained network, with ECT's continuous-time schedule.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score
    python -m experiments.run --config ml_collections_configs/digits_ct.py --workdir runs/digits_ct

No teacher in the update: the pairs are the same data point noised to t and r(t), the student
starts from the teacher's EMA weights (`distill.teacher`, default runs/digits_score). iCT's
pseudo-Huber distance and level sampling; `digits_cd.py`'s batch, learning rate and EMA.
Evaluated with 1, 2 and 4 steps.
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_cd")
    c.objective = "ct"
    c.distill.cm_schedule = "ect"
    c.distill.cm_loss = "pseudo_huber"
    return c
