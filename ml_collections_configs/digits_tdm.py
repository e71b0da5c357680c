"""Trajectory Distribution Matching (TDM, arXiv 2503.06674) of the digits U-Net teacher.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score
    python -m experiments.run --config ml_collections_configs/digits_tdm.py --workdir runs/digits_tdm

Data-free (reverse KL, no GAN, no discriminator): a K = 4 step student (`distill.num_student_steps`)
with deterministic DDIM re-noising, matched segment by segment along its own trajectory; the fake
score is trained on the same trajectory points with weight min(1/sigma^2, 5) times TDM's
importance weight. Generator and fake score start from the teacher (`distill.teacher`, default
runs/digits_score). results.json: the K-step sampler's metrics, `nfe` = K.
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_fdistill")
    c.objective = "tdm"
    c.distill.divergence = "rkl"
    c.distill.lambda_gan = 0.0
    c.distill.num_student_steps = 4
    c.distill.student_sigmas = "karras"
    c.distill.tdm_snr_clip = 5.0
    c.distill.tdm_importance_weight = True
    c.distill.fake_updates_per_gen = 2  # as digits_fdistill (TDM uses 1; see gmm_tdm.py for why not here)
    # Lowest distillation level: Karras index 200 of 1000, sigma = 0.085, the analogue of TDM's t >= 20
    # floor (sigma_VE ~ 0.1 on SD's schedule). With the one-step floor (index 20, sigma = 0.003) the
    # min(SNR, 5)-weighted fake score is too coarse at tiny sigma and the generator loss spikes.
    c.distill.gen_index_min = 200
    return c
