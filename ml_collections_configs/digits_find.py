"""FIND (arXiv 2407.19453) on the 8x8 digits U-Net: the initial noise distribution optimised for the classifier's log-probability of a digit.

    python -m experiments.prepare --config ml_collections_configs/digits_find.py --workdir runs/digits_find
    python -m experiments.run --config ml_collections_configs/digits_find.py --workdir runs/digits_find

The frozen sampler is the finished score run named by `rl.sampler` (default runs/digits_score, its
35-NFE Heun ODE; made by `python -m experiments.run --config ml_collections_configs/digits_score.py
--workdir runs/digits_score`, ~20 min on 2 CPU cores, or by experiments.prepare), or a distilled
digits student (`--config.rl.sampler=<a digits_fdistill workdir>`: one U-Net call per reward
evaluation). Reward r(x) = log p_clf(target_class | x) of the cached digits classifier (default
class 3, as digits_diffusion_dpo.py). The policy is N(mu, diag sigma^2) over the 64 noise pixels
(one per class for a class-conditional sampler), held near N(0, I) by 0.1 x its KL. results.json: reward_mean, preferred_frac (the
samples classified as the target), mmd_to_reference, kl_to_prior, reward_evals, sample/* (fd_digits,
precision, recall, class_entropy) and the untrained N(0, I)'s values under reference/*; plots/ holds
the sample grids of both.
"""
from fdistill import configs


def get_config():
    c = configs.base("find", data="digits", model="unet")
    c.rl.sampler = "runs/digits_score"
    c.reward.kind = "classifier"
    c.reward.target_class = 3
    c.rl.kl_weight = 0.1  # the KL sums over the 64 noise pixels: 1 holds the mean near 0 (class-3 fraction 0.09 -> 0.19, not 0.89)
    c.train.num_steps = 200
    c.train.batch_size = 64  # reward evaluations (35-NFE samples) per step
    c.train.learning_rate = 3e-2
    c.train.grad_clip = 0.0
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.eval.num_samples = 1024
    c.eval.chunk = 512
    return c
