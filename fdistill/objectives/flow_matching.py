"""Flow matching: a velocity network on the linear interpolant (arXiv 2209.03003, 2210.02747).

    L(theta) = E_{t, x_0 ~ data, eps ~ N(0, I)} || F_theta(x_t, t) - (eps - x_0) ||^2,
    x_t = (1 - t) x_0 + t eps,   t ~ logit-normal(config.flow.t_mean, config.flow.t_std) or uniform,

(mean over features). The minimiser is the velocity E[eps - x_0 | x_t]. Samples integrate
dx/dt = F from t = 1 to 0 with N uniform Euler or Heun steps (`config.eval`). The network is a
`denoiser.VelocityDenoiser` (`config.model.parametrisation='velocity'`), so a finished run is a
teacher for every distillation objective exactly as a score run is (`--config.distill.teacher=<workdir>`):
it converts to D(x; sigma) at sigma = t / (1 - t) (`fdistill.flow`). Everything else (EMA, data,
the denoiser errors against the exact mixture) is the score objective's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import flow
from fdistill.configs import ConfigError
from fdistill.denoiser import VelocityDenoiser, label_kwargs, sample_chunked
from fdistill.objectives.base import register
from fdistill.objectives.score import ScoreObjective


@register("flow")
class FlowMatchingObjective(ScoreObjective):
    """Trains a velocity network on `config.data`; evaluates uniform-step Euler/Heun samples in t."""

    def __init__(self, config):
        super().__init__(config)
        if not isinstance(self.denoiser, VelocityDenoiser):
            raise ConfigError(f"config.model.parametrisation={config.model.parametrisation!r}: the 'flow' objective "
                             "trains a velocity network; set it to 'velocity'")
        flow.check_t_distribution(config.flow.t_distribution)

    def noise_level(self, key, b: int) -> dict:
        """{'t': [b]} from `config.flow`'s distribution (the score objective's noised inputs use it)."""
        f = self.config.flow
        return {"t": flow.sample_t(key, (b,), f.t_distribution, f.t_mean, f.t_std)}

    def loss(self, params, inputs, rngs=None) -> jax.Array:
        x0, eps, t = inputs["x0"], inputs["noise"], inputs["t"]
        kw = label_kwargs(self.num_classes, inputs.get("labels"))
        v = self.denoiser.velocity(params, flow.interpolate(x0, eps, t), t, rngs=rngs, **kw)
        return jnp.mean((v - flow.target_velocity(x0, eps)) ** 2)

    def sample(self, params, key, n: int, num_steps: int | None = None, labels=None) -> np.ndarray:
        """n samples of the flow ODE: N uniform steps in t (Euler or Heun), jitted chunks."""
        e = self.config.eval
        return sample_chunked(self.denoiser, params, self.source.shape, key, n, num_steps or e.num_steps, e.sampler,
                              self.config.diffusion, e.chunk, self.num_classes, labels, space="t")

    def sampler_name(self) -> str:
        e = self.config.eval
        return f"flow matching, {e.num_steps}-step {e.sampler} in t"
