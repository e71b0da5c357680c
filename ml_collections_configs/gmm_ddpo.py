"""DDPO (arXiv 2305.13301, DDPO_IS): a GMM score network fine-tuned through its stochastic sampler for a known reward.

    python -m experiments.prepare --config ml_collections_configs/gmm_ddpo.py --workdir runs/gmm_ddpo
    python -m experiments.run --config ml_collections_configs/gmm_ddpo.py --workdir runs/gmm_ddpo

The policy starts from the finished score run named by `rl.sampler` (default runs/gmm_score;
`experiments.prepare` trains it when missing) and is its 20-level ancestral sampler (eta = 1). The
reward is gmm_diffusion_dpo.py's (`--config.reward.kind=mode_subset --config.reward.modes=(0,1)`
etc.). Each step samples 256 trajectories, then makes `rl.inner_updates` = 4 clipped updates on
them. results.json: reward_mean, preferred_frac, preferred_on_data_frac, mmd_to_reference,
reward_evals, sample/* and the untrained network's values (same sampler and noise) under reference/*.
"""
from fdistill import configs


def get_config():
    c = configs.base("ddpo", data="gmm", model="mlp")
    c.rl.sampler = "runs/gmm_score"
    c.train.num_steps = 300
    c.train.batch_size = 256  # trajectories (reward evaluations) per step
    c.train.learning_rate = 1e-4
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    return c
