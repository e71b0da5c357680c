"""GRPO (arXiv 2402.03300) of the synthetic-language SFT policy on its true reward, on-policy.

    python -m experiments.prepare --config ml_collections_configs/synthetic_grpo.py --workdir runs/synthetic_grpo
    python -m experiments.run --config ml_collections_configs/synthetic_grpo.py --workdir runs/synthetic_grpo

The SFT run, task, model, evaluation and results.json keys are synthetic_dpo.py's. Each step draws
`train.batch_size` = 16 training prompts (a function of (train.seed, step)), samples
`po.group_size` = 8 responses per prompt from the current policy inside the jitted step, scores
them with the true reward and takes one clipped policy-gradient step with group-normalised
advantages and the k3 KL estimate to the SFT reference weighted by `po.beta`
(`fdistill.objectives.online`). 128 responses per step, as many as synthetic_dpo.py's 64 pairs.
"""
from fdistill import configs


def get_config():
    c = configs.load("synthetic_dpo")
    c.objective = "grpo"
    c.po.beta = 0.04  # DeepSeekMath's KL weight
    c.po.group_size = 8
    c.po.clip_eps = 0.2
    c.train.batch_size = 16  # prompts per step
    c.train.learning_rate = 1e-4
    return c
