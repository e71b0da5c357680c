"""The f-distill generator update applied to samples as free particles, with the exact critic.

The generator loss of `objectives.distill.DistillObjective.generator_loss` has gradient
g = (D_fake - D_real) w h in each sample x. Moving the samples themselves, x <- x - step_size g, is
gradient descent on the same loss with one free parameter per sample: a generator that could put
each sample where the objective says. With the run's divergence, final noise range (grid indices
drawn uniformly in [gen_index_min, gen_index_max_end], or gen_index_max when the range is fixed:
`NoiseLevels.draw_index` at progress 1), ratio clip and DMD weight, and the exact critic of the
particles themselves (`distillation.oracle`: the noised kernel density of the current particles and
the exact noised teacher), it tells the objective's limits from the generator network's
(`experiments/studies/particles.py`). The ratio is exact, so the learned critic's per-bin ratio
normalisation is not applied.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fdistill import divergences
from fdistill.distillation import losses, oracle


def particle_update(objective, frozen):
    """step(x, key, step_size) -> x moved by the generator update with the exact critic (module
    docstring). `objective`: a one-step `DistillObjective` on the analytic mixture."""
    dc, levels, teacher = objective.dc, objective.levels, objective.teacher
    div = divergences.from_config(dc)
    gmm = objective.source.gmm

    @jax.jit
    def step(x, key, step_size):
        k_i, k_n = jax.random.split(key)
        sigma = levels.grid[levels.draw_index(k_i, x.shape[0], 1.0)]
        x_t = x + sigma[:, None] * jax.random.normal(k_n, x.shape)
        d_real = teacher(frozen["teacher"], x_t, sigma)
        d_fake = oracle.kde_denoiser(x, x_t, sigma)
        r = losses.ratio_from_logits(oracle.log_ratio(gmm.log_prob, x, x_t, sigma), dc.logit_clip, dc.ratio_min,
                                     dc.ratio_max)
        h = losses.normalized_h(div, r)
        w = losses.teacher_error_weight(x, d_real) if dc.teacher_error_norm else jnp.ones_like(h)
        return x - step_size * (d_fake - d_real) * (w * h)[:, None]

    return step
