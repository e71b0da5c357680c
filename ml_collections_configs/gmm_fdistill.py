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
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "distill"

    c.data = ml_collections.ConfigDict()
    c.data.name = "gmm"
    c.data.layout = "ring"  # grid | ring | random
    c.data.num_modes = 8
    c.data.dim = 2
    c.data.mode_std = 0.05
    c.data.radius = 1.0
    c.data.imbalance = 20.0  # largest / smallest mode weight: small modes expose mode-seeking
    c.data.seed = 0

    # Generator, fake score (and the separate discriminator trunk, if any).
    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.width = 64
    c.model.depth = 3
    c.model.emb_dim = 64

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.sigma_data = 0.5
    c.diffusion.p_mean = -1.2
    c.diffusion.p_std = 1.2
    c.diffusion.sigma_min = 0.002
    c.diffusion.sigma_max = 80.0
    c.diffusion.rho = 7.0

    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = "analytic"  # 'analytic' (GMM only) or the workdir of a finished score run
    c.distill.divergence = "js"  # rkl | kl | js | sh | jf | sf | pearson | neyman | alpha
    c.distill.alpha = 0.5  # only for divergence='alpha' (h = r^alpha)
    c.distill.fake_updates_per_gen = 5  # critic (fake score + discriminator) updates per generator update
    c.distill.critic_loop = "scan"  # scan | unroll (unroll for conv nets on CPU)
    c.distill.lambda_gan = 1e-3  # generator GAN loss weight (DMD2 / FastGen default)
    c.distill.disc_on = "fake_score"  # fake_score (head on its hidden features, DMD2) | separate
    c.distill.disc_loss_weight = 1.0  # discriminator loss weight in the critic update
    c.distill.disc_hidden = 128
    c.distill.disc_depth = 2
    c.distill.logit_clip = 10.0
    c.distill.ratio_min = 0.1
    c.distill.ratio_max = 20.0
    c.distill.ratio_bins = 10  # noise-level bins of normalisation stage 1 (0 disables it)
    c.distill.ratio_ema = 0.0  # EMA rate of the bin means (FastGen: 0 on CIFAR-10, 0.5 on ImageNet)
    c.distill.teacher_error_norm = True  # DMD weight w = 1 / mean|x - D_real|
    c.distill.num_sigmas = 1000  # Karras grid size; generator / discriminator noise-level indices:
    c.distill.gen_index_min = 20
    c.distill.gen_index_max = 980
    c.distill.fake_sigma = "karras"  # karras (index-uniform, EDM weight; DMD2) | lognormal (EDM)
    c.distill.gen_sigma = 80.0  # G(z) = D_gen(gen_sigma z; gen_sigma)
    c.distill.lr_gen = 1e-3
    c.distill.lr_fake = 1e-3
    c.distill.lr_disc = 1e-3
    c.distill.ratio_eval_sigma_min = 0.05
    c.distill.ratio_eval_sigma_max = 2.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000  # generator updates
    c.train.batch_size = 128
    c.train.learning_rate = 1e-3  # default for any distill.lr_* left None
    c.train.warmup_steps = 0
    c.train.grad_clip = 1.0
    c.train.weight_decay = 0.0
    c.train.seed = 0
    c.train.log_every = 250
    c.train.eval_every = 0
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.compute_dtype = "float32"

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 8192
    c.eval.num_steps = 18  # teacher Heun: NFE = 35
    c.eval.sampler = "heun"
    c.eval.chunk = 4096
    return c
