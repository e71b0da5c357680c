"""EDM score estimation (denoising score matching) on an analytic 2-D Gaussian mixture.

    python -m experiments.run --config ml_collections_configs/gmm_score.py --workdir runs/gmm_score

Trains a residual-MLP EDM denoiser on an 8-mode ring, evaluates 35-NFE Heun samples against the
exact mixture (mode coverage, weight TV, MMD) and the denoiser against the exact GMM denoiser.
"""
from fdistill import configs


def get_config():
    c = configs.base("score", data="gmm", model="mlp")  # 8-mode ring, equal weights; residual MLP 3x128
    c.train.num_steps = 20000
    c.train.batch_size = 512
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.999
    c.train.log_every = 500
    c.train.eval_every = 10000
    c.train.checkpoint_every = 5000
    c.eval.num_samples = 8192
    c.eval.num_steps = 18  # Heun: NFE = 2 * 18 - 1 = 35
    return c
