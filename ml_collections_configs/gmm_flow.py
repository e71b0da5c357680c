"""Flow matching (rectified flow) on the analytic 2-D Gaussian mixture: a velocity-network teacher.

    python -m experiments.run --config ml_collections_configs/gmm_flow.py --workdir runs/gmm_flow

The gmm_score.py set-up with the flow-matching loss: a residual-MLP velocity network on the
linear interpolant x_t = (1 - t) x + t eps (logit-normal t), 18 uniform Heun steps in t (NFE 35)
evaluated against the exact mixture. Its workdir is a teacher for every distillation config
(`--config.distill.teacher=runs/gmm_flow`), converted exactly to an EDM denoiser.
"""
from fdistill import configs


def get_config():
    c = configs.base("flow", data="gmm", model="mlp")  # model.parametrisation = 'velocity'
    score = configs.load("gmm_score")
    c.train, c.eval = score.train, score.eval  # 20000 steps, batch 512, EMA; 18 Heun steps (in t: NFE 35)
    return c
