"""f-distill (arXiv 2502.15681): a one-step generator distilled from the exact GMM teacher.

    python -m experiments.run --config ml_collections_configs/gmm_fdistill.py --workdir runs/gmm_fdistill

(about 4.5 min on 2 CPU cores: 20000 generator updates of batch 128, 5 critic updates each. The
length matters: at 5000 updates the student is still a curve through the modes, and the modes
become 2-D blobs as the cosine schedule decays the generator's learning rate.)

Jensen-Shannon weighting h(r) = r / (1 + r) by default (`--config.distill.divergence=kl|rkl|sf|sh|jf|
pearson|neyman|alpha`, with `--config.distill.alpha=0.5` for the alpha family). The teacher is the
analytic denoiser of an imbalanced 8-mode ring (largest / smallest weight = 20); pass
`--config.distill.teacher=<workdir of a finished score run> --config.distill.latent_dim=0` to
distill a trained network instead (the generator and the fake score then start from its EMA
parameters, so z has the data's shape). Writes results.json with the student's 1-NFE sample
metrics, the teacher's 35-NFE Heun metrics (`teacher/...`), `speedup` and `ratio_spearman`
(discriminator log r against the exact log density ratio). The GAN weight, noise levels, latent
size and schedule come from the student-quality study (`experiments/results/student_quality.md`).
"""
from fdistill import configs


def get_config():
    c = configs.base("distill", data="gmm", model="mlp")
    c.data.imbalance = 20.0  # largest / smallest mode weight: small modes expose mode-seeking
    c.model.width = 64  # generator and fake score
    c.distill.teacher = "analytic"
    c.distill.divergence = "js"
    c.distill.fake_updates_per_gen = 5
    # The student-quality study (experiments/results/student_quality.md) chose the next five lines:
    c.distill.lambda_gan = 1e-2  # GAN weight (DMD2 / FastGen use 1e-3: a thin curve through the modes here)
    c.distill.gen_index_min = 150  # distillation noise levels: grid indices 150..350 of 1000, sigma 0.04..0.57
    c.distill.gen_index_max = 350  # (mode width to mode spacing), not 20..980 (sigma 0.003..72)
    c.distill.latent_dim = 8  # z in R^8 for 2-D data: a 2-D z folds into a curve
    c.distill.gen_lr_schedule = "cosine"  # generator learning rate decays to 0 over train.num_steps
    c.distill.lr_gen = 1e-3
    c.distill.lr_fake = 1e-3
    c.distill.lr_disc = 1e-3
    c.train.num_steps = 20000  # generator updates
    c.train.batch_size = 128
    c.train.log_every = 1000
    c.train.checkpoint_every = 2500
    c.eval.num_samples = 8192
    c.eval.num_steps = 18  # teacher Heun: NFE = 35
    return c
