"""f-distill (arXiv 2502.15681): a one-step U-Net generator distilled from the digits EDM teacher.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score
    python -m experiments.run --config ml_collections_configs/digits_fdistill.py --workdir runs/digits_fdistill_js

The first command trains the teacher (about 20 minutes on 2 CPU cores); the second distils it
(`config.distill.teacher`, default runs/digits_score) with the unchanged f-distill objective: the
generator and the fake score start from the teacher's EMA weights and copy its U-Net architecture,
and the discriminator is a head on the fake score's U-Net bottleneck (DMD2). Any divergence of the
registry: `--config.distill.divergence=rkl|kl|js|sh|jf|sf|pearson|neyman|alpha` (rkl without a GAN
term, `--config.distill.lambda_gan=0`, is DMD/VSD). Writes sample grids to plots/ and results.json
with the student's 1-NFE fd_digits, precision, recall, class_entropy and samples_per_sec, the
teacher's (`teacher/...`, 35-NFE Heun) and the `speedup`.
"""
from fdistill import configs


def get_config():
    c = configs.base("distill", data="digits", model="unet")  # the model is the teacher's (copied)
    c.distill.teacher = "runs/digits_score"  # workdir of a finished digits score run
    c.distill.divergence = "js"
    c.distill.fake_updates_per_gen = 2
    c.distill.critic_loop = "unroll"  # conv gradients inside lax.scan are slow on CPU
    c.distill.lambda_gan = 3e-3
    c.distill.disc_on = "fake_score"  # head on the fake score's U-Net bottleneck (4x4x64)
    c.distill.lr_gen = 1e-4  # half the critic rate: 2e-4 degraded after ~400 steps (fd_digits 18-27 -> 38-47)
    c.distill.lr_fake = 2e-4
    c.distill.lr_disc = 2e-4
    c.train.num_steps = 800  # generator updates (about 7 minutes on 2 CPU cores)
    c.train.batch_size = 32
    c.train.learning_rate = 2e-4
    c.train.log_every = 50
    c.train.eval_every = 400  # also writes a sample grid to plots/
    c.train.checkpoint_every = 200
    c.eval.num_samples = 4096
    c.eval.num_steps = 18  # teacher Heun: NFE = 35
    c.eval.chunk = 512
    return c
