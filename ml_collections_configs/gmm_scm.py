"""Continuous-time consistency distillation (sCD, TrigFlow; arXiv 2410.11081) of the analytic mixture teacher.

    python -m experiments.run --config ml_collections_configs/gmm_scm.py --workdir runs/gmm_scm

`gmm_cd.py`'s set-up (imbalanced 8-mode ring, residual MLP of width 128, 20000 updates, batch 512, EMA):
the tangent of f along the teacher's PF-ODE is one `jax.jvp` instead of cd's Heun step between two
grid levels. The paper's sCD levels (ln sigma ~ N(-1.0, 1.4^2)) and time conditioning on t (scaled by 0.1:
`fdistill.objectives.scm`), a tangent warmup of 10% of the run (the paper's 10000 updates of 100k+), but
neither the paper's tangent normalisation nor its adaptive weight: measured at 20000 updates (seed 0),
with both the 1-step high-quality fraction was 0.12 (MMD 0.14, one mode of eight), without them 0.68
(MMD 0.019); at 4000 updates normalisation alone (c = 0.1, 1.0) gave 0.17 and 0.24, the adaptive weight
alone drifted away from the ODE (1-step MMD 1.2). The paper's recipe: `--config.distill.scm_tangent_norm=True
--config.distill.scm_adaptive_weight=True`. Training without a teacher (sCT):
`--config.distill.scm_tangent=data`. A finished score or flow run is a teacher too, as for `gmm_cd.py`
(`--config.distill.teacher=<workdir>`, or `experiments.prepare` with an empty one), with
`--config.distill.scm_time_conditioning=edm`: the student then starts from the teacher's weights (not
measured; from scratch 'edm' failed). Evaluated with 1 (the configured `num_student_steps`), 2 (t = 1.1,
the paper's) and 4 steps.
"""
from fdistill import configs


def get_config():
    c = configs.load("gmm_cd")
    c.objective = "scm"
    c.distill.cm_p_mean = -1.0
    c.distill.cm_p_std = 1.4
    c.distill.scm_tangent_warmup = 2000
    c.distill.scm_tangent_norm = False
    c.distill.scm_adaptive_weight = False
    return c
