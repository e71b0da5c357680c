"""DMD2 multi-step generator with backward simulation (arXiv 2405.14867, section 4.4).

    python -m experiments.run --config ml_collections_configs/gmm_dmd2_multistep.py --workdir runs/gmm_dmd2_multistep

`gmm_dmd2.py` (reverse KL + GAN, five critic updates per generator update, analytic GMM teacher)
with a K-step student: `--config.distill.num_student_steps=4` (default) steps at the noise levels
`--config.distill.student_sigmas=karras` (the first K of K + 1 Karras points from gen_sigma=80 to
sigma_min: [80, 17.6, 2.53, 0.171] for K = 4) or an explicit comma-separated list. Each training
input is produced by the current generator from pure noise (fresh noise re-noising, no teacher
samples). Any divergence works: `--config.distill.divergence=js` etc. results.json reports the
K-step sampler's metrics with `nfe` = K and `samples_per_sec`.

`--config.distill.step_aware_critic=True` conditions the fake score and discriminator on the step
that produced a sample. Measured on this mixture (3 seeds, README "few-step" tables): with it K = 2
beats K = 1 (coverage / TV / MMD 0.75 / 0.094 / 0.031 against 0.67 / 0.136 / 0.047 at 2000
updates), but K = 4 stays below K = 1 at 2000 and at 8000 updates (coverage 0.46 against 0.71 at
8000): the budget at which K = 4 catches up is not known here (more than 8000 updates).
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_dmd2")
    c.objective = "dmd2_multistep"
    c.distill.num_student_steps = 4
    # The few-step students keep the settings they were measured with before the one-step study
    # (experiments/results/student_quality.md): 2000 updates, lambda_gan 1e-3, noise indices 20..980,
    # a z of the data's shape (steps after the first take it), a constant learning rate.
    configs.override(c, configs.STUDENT_BEFORE_STUDY)
    c.distill.student_sigmas = "karras"  # or e.g. "80,17.6,2.53,0.171"
    c.distill.sampler_seed = 0  # keys the sampler's fresh re-noising noise at evaluation
    return c
