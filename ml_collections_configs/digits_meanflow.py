"""MeanFlow (arXiv 2505.13447) on 8x8 handwritten digits, from the data alone.

    python -m experiments.run --config ml_collections_configs/digits_meanflow.py --workdir runs/digits_meanflow

`digits_flow.py`'s U-Net, data, batch (64) and EMA (0.999), for 4000 updates (half the flow teacher's: the
jvp makes an update about 2.5 times as slow; about 35 minutes on one CPU core), with `gmm_meanflow.py`'s
MeanFlow settings (r < t for 25% of the pairs, (t, r) uniform, plain squared error). Evaluated
with 1 step (and 2, 4: `steps2/...`, `steps4/...`).
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_flow")
    c.objective = "meanflow"
    mf = configs.load("gmm_meanflow").flow
    c.flow.t_distribution, c.flow.meanflow_ratio = mf.t_distribution, mf.meanflow_ratio
    c.flow.meanflow_p = mf.meanflow_p
    c.train.num_steps = 4000
    c.eval.num_steps = 1
    c.eval.num_samples = 4096  # as the digits distillation configs (fd_digits depends on the sample count)
    return c
