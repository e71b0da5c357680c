"""f-distill (arXiv 2502.15681): a one-step generator distilled from the exact GMM teacher.

    python -m experiments.run --config ml_collections_configs/gmm_fdistill.py --workdir runs/gmm_fdistill

(about 4.5 min on 2 CPU cores: 20000 generator updates of batch 128, 5 critic updates each.)

Jensen-Shannon weighting h(r) = r / (1 + r) by default (`--config.distill.divergence=kl|rkl|sf|sh|jf|
pearson|neyman|alpha`, with `--config.distill.alpha=0.5` for the alpha family). The teacher is the
analytic denoiser of an imbalanced 8-mode ring (largest / smallest weight = 20); pass
`--config.distill.teacher=<workdir of a finished score run> --config.distill.latent_dim=0
--config.distill.latent_categories=0 --config.distill.latent_continuous_scale=1` to distill a trained
network instead (the generator and the fake score then start from its EMA parameters, so z has the
data's shape). Writes results.json with the student's 1-NFE sample metrics, the teacher's 35-NFE Heun
metrics (`teacher/...`), `speedup` and `ratio_spearman` (discriminator log r against the exact log
density ratio).

The generator draws one of 256 uniform categories (one-hot) beside an 8-D z that enters the network
times 0.1, so it starts as 256 small clusters that move like particles and settle in modes as 2-D
blobs; the distillation noise levels start up to sigma 2.5 (grid index 500, wider than the mode
spacing, so clusters can still move between modes) and narrow to sigma 0.57 (index 350, the mode
spacing) by the last update. A continuous z alone draws light modes as smears along the ring
(`configs.STUDENT_CONTINUOUS` restores that generator). The GAN weight, noise levels, latent and
schedule come from the student-quality study (`experiments/results/student_quality.md`).
"""
from fdistill import configs


def get_config():
    c = configs.base("distill", data="gmm", model="mlp")
    c.data.imbalance = 20.0  # largest / smallest mode weight: small modes expose mode-seeking
    c.model.width = 64  # generator and fake score
    c.distill.teacher = "analytic"
    c.distill.divergence = "js"
    c.distill.fake_updates_per_gen = 5
    # The student-quality study (experiments/results/student_quality.md) chose the next eight lines:
    c.distill.lambda_gan = 1e-2  # GAN weight (DMD2 / FastGen use 1e-3: a thin curve through the modes here)
    c.distill.gen_index_min = 150  # distillation noise levels: grid indices 150..500 of 1000, sigma 0.04..2.5
    c.distill.gen_index_max = 500  # (mode width to beyond the mode spacing), not 20..980 (sigma 0.003..72);
    c.distill.gen_index_max_end = 350  # the upper index narrows linearly to sigma 0.57 by the last update
    c.distill.latent_dim = 8  # z in R^8 for 2-D data: a 2-D z folds into a curve
    c.distill.latent_categories = 256  # one-hot category beside z: the generator moves like 256 particles
    c.distill.latent_continuous_scale = 0.1  # z's share: each category is a small 2-D cluster
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
