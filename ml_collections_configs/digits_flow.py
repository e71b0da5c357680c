"""Flow matching (rectified flow) on 8x8 handwritten digits with the U-Net of digits_score.py.

    python -m experiments.run --config ml_collections_configs/digits_flow.py --workdir runs/digits_flow

The digits_score.py set-up (U-Net widths 32, 64; 8000 steps, batch 64, EMA 0.999) with the
flow-matching loss and a velocity network; 18 uniform Heun steps in t (NFE 35) for the metrics
(fd_digits, precision, recall, class_entropy). Its workdir is a teacher for the digits distillation
configs (`--config.distill.teacher=runs/digits_flow`), as a digits_score run is.
"""
from fdistill import configs


def get_config():
    c = configs.base("flow", data="digits", model="unet")  # model.parametrisation = 'velocity'
    score = configs.load("digits_score")
    c.data, c.model.channels, c.model.channel_mult = score.data, score.model.channels, score.model.channel_mult
    c.train, c.eval = score.train, score.eval  # the score teacher's schedule and evaluation
    return c
