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
    c.train.num_steps = 20000
    c.train.batch_size = 512
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.999
    c.train.log_every = 500
    c.train.eval_every = 10000
    c.train.checkpoint_every = 5000
    c.eval.num_samples = 8192
    c.eval.num_steps = 18  # Heun in t: NFE = 2 * 18 - 1 = 35
    return c
