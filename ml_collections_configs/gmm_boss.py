"""BOSS (arXiv 2312.16414): the Bellman-optimal N-step Euler schedule of a flow-matching teacher on
the mixture, then straightening of the velocity network on that schedule.

    python -m experiments.prepare --config ml_collections_configs/gmm_boss.py --workdir runs/gmm_boss
    python -m experiments.run --config ml_collections_configs/gmm_boss.py --workdir runs/gmm_boss \
        --config.distill.teacher=runs/gmm_boss/teacher

(`experiments.prepare` trains the gmm_flow teacher on this config's mixture into runs/gmm_boss/teacher.)
N = `distill.num_student_steps` (4) Euler steps chosen on a 200-step fine grid from 1024 reference
trajectories, then 2000 refinement updates. results.json holds the refined student (the run's row),
`uniform/...` (the teacher with 4 uniform steps), `schedule/...` (the teacher on the BOSS schedule)
and the schedule (`boss_t0..boss_t4`).
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_fdistill")  # the imbalanced 8-mode ring
    c.objective = "boss"
    c.distill.teacher = ""  # the workdir of a finished gmm_flow run on this mixture (experiments.prepare makes one)
    configs.override(c, configs.DATA_SHAPED_LATENT)  # z of the data's shape: the teacher's own noise
    c.distill.num_student_steps = 4
    c.distill.lr_gen = 1e-4
    c.train.lr_schedule = "cosine"
    c.train.num_steps = 2000
    c.train.batch_size = 256
    c.train.log_every = 250
    c.train.checkpoint_every = 1000
    return c
