"""KTO (arXiv 2402.01306) of the synthetic-language SFT policy on the same preference data, unpaired.

    python -m experiments.prepare --config ml_collections_configs/synthetic_kto.py --workdir runs/synthetic_kto
    python -m experiments.run --config ml_collections_configs/synthetic_kto.py --workdir runs/synthetic_kto

Everything as `synthetic_dpo.py` (the SFT run in `po.sft_workdir`, the Bradley-Terry pairs it
writes, the evaluation and the keys of results.json), except the objective: each pair's chosen
response is a desirable example and its rejected one an undesirable example
(`fdistill.data.preference.UnpairedExamples`), trained with KTO's loss against the batch estimate
of KL(pi || pi_ref) (`fdistill.objectives.preference.kto_loss`). `po.beta` (0.1, TRL's default),
`po.desirable_weight` / `po.undesirable_weight` (lambda_D / lambda_U, 1 / 1: the data are
balanced). A batch holds 128 examples, as many responses as synthetic_dpo.py's 64 pairs.
"""
from fdistill import configs


def get_config():
    c = configs.load("synthetic_dpo")
    c.objective = "kto"
    c.po.precompute_ref = False  # KTO's KL completions change with every batch
    c.train.batch_size = 128  # examples (a pair gives two)
    return c
