"""f-distill (arXiv 2502.15681): a one-step generator distilled from the exact GMM teacher.

    python -m experiments.run --config ml_collections_configs/gmm_fdistill.py --workdir runs/gmm_fdistill

(about 1.2 min on 2 CPU cores: 2000 generator updates of batch 128, 5 critic updates each.)

Jensen-Shannon weighting h(r) = r / (1 + r) by default (`--config.distill.divergence=kl|rkl|sf|sh|jf|
pearson|neyman|alpha`, with `--config.distill.alpha=0.5` for the alpha family). The teacher is the
analytic denoiser of an imbalanced 8-mode ring (largest / smallest weight = 20); pass
`--config.distill.teacher=<workdir of a finished score run>` to distill a trained network instead
(the generator and the fake score then start from its EMA parameters). Writes results.json with
the student's 1-NFE sample metrics, the teacher's 35-NFE Heun metrics (`teacher/...`), `speedup`
and `ratio_spearman` (discriminator log r against the exact log density ratio).
"""
from fdistill import configs


def get_config():
    c = configs.base("distill", data="gmm", model="mlp")
    c.data.imbalance = 20.0  # largest / smallest mode weight: small modes expose mode-seeking
    c.model.width = 64  # generator and fake score
    c.distill.teacher = "analytic"
    c.distill.divergence = "js"
    c.distill.fake_updates_per_gen = 5
    c.distill.lambda_gan = 1e-3  # DMD2 / FastGen default
    c.distill.lr_gen = 1e-3
    c.distill.lr_fake = 1e-3
    c.distill.lr_disc = 1e-3
    c.train.num_steps = 2000  # generator updates
    c.train.batch_size = 128
    c.train.log_every = 250
    c.train.checkpoint_every = 1000
    c.eval.num_samples = 8192
    c.eval.num_steps = 18  # teacher Heun: NFE = 35
    return c
