"""DDPO (arXiv 2305.13301, DDPO_IS) on the 8x8 digits U-Net with the classifier's log-probability of a digit as reward.

    python -m experiments.prepare --config ml_collections_configs/digits_ddpo.py --workdir runs/digits_ddpo
    python -m experiments.run --config ml_collections_configs/digits_ddpo.py --workdir runs/digits_ddpo

The policy starts from the finished score run named by `rl.sampler` (default runs/digits_score;
see digits_find.py) and is its 10-level ancestral sampler (eta = 1; fewer levels than on the
mixture, since every step back-propagates through all of them). Reward r(x) = log p_clf(3 | x), as
digits_diffusion_dpo.py and digits_find.py. Each step samples 32 trajectories and makes 2 clipped
updates on them. results.json: reward_mean, preferred_frac, mmd_to_reference, reward_evals,
sample/* (fd_digits, precision, recall, class_entropy) and the untrained network's values (same
sampler and noise) under reference/*; plots/ holds the sample grids.
"""
from fdistill import configs


def get_config():
    c = configs.base("ddpo", data="digits", model="unet")
    c.rl.sampler = "runs/digits_score"
    c.rl.ddpo_steps = 10
    c.rl.inner_updates = 2
    c.reward.kind = "classifier"
    c.reward.target_class = 3
    c.train.num_steps = 100
    c.train.batch_size = 32  # trajectories (reward evaluations) per step
    c.train.learning_rate = 1e-5
    c.train.log_every = 5
    c.train.checkpoint_every = 50
    c.eval.num_samples = 1024
    c.eval.chunk = 512
    return c
