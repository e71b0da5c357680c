"""MeanFlow (arXiv 2505.13447): a one-step generator of the analytic 2-D mixture trained from its
samples alone with the MeanFlow identity (no teacher, no distillation).

    python -m experiments.run --config ml_collections_configs/gmm_meanflow.py --workdir runs/gmm_meanflow

The gmm_flow.py set-up (residual MLP velocity network, 20000 updates, batch 512), r < t for 25% of
the pairs as in the paper, but (t, r) uniform and the plain squared error (p = 0) instead of the
paper's logit-normal(-0.4, 1.0) and adaptive weight p = 1. Measured at 4000 updates (1 / 2 / 4-step
high-quality fraction): paper's choices 0.79 / 0.93 / 0.95 but mode coverage 0.125 / 0.5 / 0.5
(p = 1 weights the regression towards the conditional velocity's mode, not its mean: at r = t the
error stayed 0.8 of |v|), logit-normal with p = 0: 1-step MMD 0.97 (pairs with r near 0 and t near 1
are rarely drawn), uniform with p = 0: 0.34 / 0.58 / 0.67, MMD 0.14 / 0.045 / 0.043.
Evaluated with 1 step (and 2, 4: `steps2/...`, `steps4/...`).
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_flow")
    c.objective = "meanflow"
    c.flow.t_distribution = "uniform"
    c.flow.meanflow_ratio = 0.25
    c.flow.meanflow_p = 0.0
    c.eval.num_steps = 1
    return c
