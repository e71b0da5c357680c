"""Online DPO (arXiv 2402.04792) of the synthetic-language SFT policy, on-policy.

    python -m experiments.prepare --config ml_collections_configs/synthetic_online_dpo.py --workdir runs/synthetic_online_dpo
    python -m experiments.run --config ml_collections_configs/synthetic_online_dpo.py --workdir runs/synthetic_online_dpo

As synthetic_dpo.py, but each step's 64 pairs are two responses of the *current* policy per prompt
(sampled inside the jitted step), labelled by a Bradley-Terry draw on the true reward at
`po.pairs.bt_temperature` (the offline pairs' labelling); any registry loss `po.loss` (dpo, beta 0.1)
against the SFT reference (`fdistill.objectives.online`).
"""
from fdistill import configs


def get_config():
    c = configs.load("synthetic_dpo")
    c.objective = "online_dpo"
    c.train.batch_size = 64  # prompts = pairs per step
    return c
