"""MeanFlow (arXiv 2505.13447): a one-step generator of the analytic 2-D mixture trained from its
samples alone with the MeanFlow identity (no teacher, no distillation).

    python -m experiments.run --config ml_collections_configs/gmm_meanflow.py --workdir runs/gmm_meanflow

The gmm_flow.py set-up (residual MLP velocity network, 20000 updates, batch 512) with the paper's
choices: (t, r) logit-normal(-0.4, 1.0), r < t for 25% of the pairs, adaptive loss weight p = 1.
Evaluated with 1 step (and 2, 4: `steps2/...`, `steps4/...`).
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_flow")
    c.objective = "meanflow"
    c.flow.t_mean = -0.4
    c.flow.t_std = 1.0
    c.flow.meanflow_ratio = 0.25
    c.eval.num_steps = 1
    return c
