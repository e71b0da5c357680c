"""FIND (arXiv 2407.19453): the initial noise distribution of a frozen GMM sampler optimised for a known reward.

    python -m experiments.prepare --config ml_collections_configs/gmm_find.py --workdir runs/gmm_find
    python -m experiments.run --config ml_collections_configs/gmm_find.py --workdir runs/gmm_find

The sampler is the finished score run named by `rl.sampler` (default runs/gmm_score, its 35-NFE
Heun ODE; `experiments.prepare` trains it when missing), or any finished distillation run of the
same data and network (the main job's student: `--config.rl.sampler=runs/gmm_fdistill
--config.data.imbalance=20 --config.model.width=64`; each reward evaluation is then one network call). The reward is gmm_diffusion_dpo.py's: r(x) = n . x, n = (cos 22.5 deg, sin 22.5 deg), or
`--config.reward.kind=mode_subset --config.reward.modes=(0,1)`. Each step draws 256 z ~ N(mu, sigma^2),
evaluates their rewards and makes one update of the reward calibration and of (mu, log sigma) with the
ratio-clipped objective on the last `rl.replay` batches, plus `rl.kl_weight` * KL to N(0, I).
results.json: reward_mean, preferred_frac, preferred_on_data_frac, mmd_to_reference, kl_to_prior,
reward_evals, sample/* and the reference's (the untrained N(0, I)) values under reference/*.
"""
from fdistill import configs


def get_config():
    c = configs.base("find", data="gmm", model="mlp")
    c.rl.sampler = "runs/gmm_score"
    c.train.num_steps = 300
    c.train.batch_size = 256  # reward evaluations per step
    c.train.learning_rate = 3e-2  # (mu, log sigma) and the calibration
    c.train.grad_clip = 0.0
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    return c
