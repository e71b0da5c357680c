"""DMD2 multi-step U-Net generator with backward simulation (arXiv 2405.14867) on the digits teacher.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score
    python -m experiments.run --config ml_collections_configs/digits_dmd2_multistep.py --workdir runs/digits_dmd2_multistep

`digits_fdistill.py` (generator and fake score start from the teacher's EMA weights; discriminator
head on the fake score's bottleneck) with DMD2's reverse KL + GAN and a K = 4 step student
(`--config.distill.num_student_steps`, noise levels `--config.distill.student_sigmas=karras`:
[80, 17.5, 2.52, 0.17]), trained on its own backward-simulated inputs. Any divergence works
(`--config.distill.divergence=js`). results.json: the K-step sampler's metrics, `nfe` = K.
"""
from fdistill import configs


def get_config():
    c = configs.load("digits_fdistill")
    c.objective = "dmd2_multistep"
    c.distill.divergence = "rkl"
    c.distill.num_student_steps = 4
    c.distill.student_sigmas = "karras"
    c.distill.sampler_seed = 0
    return c
