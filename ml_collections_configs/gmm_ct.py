"""Consistency training (improved CT, arXiv 2310.14189): a consistency model of the mixture from its
samples alone; no teacher in the update (the analytic teacher is only the evaluation's reference row).

    python -m experiments.run --config ml_collections_configs/gmm_ct.py --workdir runs/gmm_ct

iCT's recipe: pseudo-Huber distance, 1/(s_{i+1} - s_i) weights, log-normal level sampling and a
discretisation that doubles from N = 10 to 1280 over the run. Same data and network as
`gmm_cd.py`. With `--config.distill.teacher=<a score or flow run>` the student starts from that
network: consistency tuning (ECT, arXiv 2406.14548).
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_cd")
    c.objective = "ct"
    c.distill.cm_scales_min = 10
    c.distill.cm_scales_max = 1280
    c.distill.cm_loss = "pseudo_huber"
    return c
