"""RLOO (arXiv 2402.14740) of the synthetic-language SFT policy on its true reward, on-policy.

    python -m experiments.prepare --config ml_collections_configs/synthetic_rloo.py --workdir runs/synthetic_rloo
    python -m experiments.run --config ml_collections_configs/synthetic_rloo.py --workdir runs/synthetic_rloo

As synthetic_grpo.py (16 prompts x `po.group_size` = 8 responses sampled in the step), with
REINFORCE on the KL-penalised sequence reward r - beta log(pi / pi_ref) and the leave-one-out
baseline (`fdistill.objectives.online`); `po.beta` = 0.05.
"""
from fdistill import configs


def get_config():
    c = configs.load("synthetic_grpo")
    c.objective = "rloo"
    c.po.beta = 0.05
    return c
