"""BOSS (arXiv 2312.16414) on 8x8 digits: the Bellman-optimal N-step Euler schedule of a digits
flow-matching teacher, then straightening of its U-Net on that schedule.

    python -m experiments.run --config ml_collections_configs/digits_flow.py --workdir runs/digits_flow
    python -m experiments.run --config ml_collections_configs/digits_boss.py --workdir runs/digits_boss \
        --config.distill.teacher=runs/digits_flow

N = `distill.num_student_steps` (4) Euler steps chosen on a 100-step fine grid from 512 reference
trajectories; 800 refinement updates (batch 32, learning rate 1e-4, cosine decay) on a pool of 1024
teacher trajectories.
results.json holds the refined student, `uniform/...` and `schedule/...` as `gmm_boss.py` does.
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_fdistill")  # data, batch, evaluation; the student copies the teacher's U-Net
    c.objective = "boss"
    c.distill.teacher = "runs/digits_flow"  # the workdir of a finished digits_flow run
    c.distill.latent_dim = 0
    c.distill.num_student_steps = 4
    c.distill.lr_gen = configs.load("gmm_boss").distill.lr_gen
    # 512 reference trajectories for the costs, a pool of 1024 to straighten on, on a 100-step fine grid:
    # each fine trajectory costs 100 U-Net evaluations (gmm_boss.py's 16384 x 200 would take an hour here)
    c.distill.boss_fine_steps = 100
    c.distill.boss_cost_samples = 512
    c.distill.boss_pool_size = 1024
    c.train.lr_schedule = "cosine"
    return c
