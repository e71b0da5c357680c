"""A Bradley-Terry reward model on the synthetic language's preference pairs (objective `reward_model`).

    python -m experiments.prepare --config ml_collections_configs/synthetic_reward_model.py --workdir runs/reward_model
    python -m experiments.run --config ml_collections_configs/synthetic_reward_model.py --workdir runs/reward_model

The SFT run and pairs are synthetic_dpo.py's (`po.sft_workdir`, `po.pairs`), here only 512
training pairs, so that the learned reward is imperfect in a measurable way (results.json:
`accuracy` on held-out pairs, `true_order_accuracy`, `true_reward_corr`). The model is a
bag-of-words MLP (`fdistill/objectives/reward_model.py`; `po.reward_width`, `po.reward_depth`). Optimise
against it with `--config.po.reward_model=<this workdir>` in synthetic_dpo.py (pairs relabelled by
it), synthetic_grpo.py or synthetic_rloo.py (rewards from it); experiments/studies/overoptimisation.py.
"""
from fdistill import configs


def get_config():
    c = configs.load("synthetic_dpo")
    c.objective = "reward_model"
    c.po.reward_width = 128
    c.po.reward_depth = 2
    c.po.precompute_ref = False  # no reference log-probs: the pairs only
    c.po.pairs.num_pairs = 512
    c.train.batch_size = 64
    c.train.num_steps = 400
    c.train.learning_rate = 1e-3
    c.train.checkpoint_every = 400
    return c
