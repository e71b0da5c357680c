"""EDM denoising score matching (Karras et al. 2022, arXiv 2206.00364, eq. 2 and eq. 8).

    L(theta) = E_{sigma ~ LogNormal(P_mean, P_std), x0 ~ data, n ~ N(0, sigma^2 I)}
               [ lambda(sigma) || D_theta(x0 + n; sigma) - x0 ||^2 ],
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

with D_theta the EDM-preconditioned network. The minimiser is E[x0 | x_sigma], so the score is
(D(x; sigma) - x) / sigma^2. Parameters keep an exponential moving average used for sampling.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import data as data_lib
from fdistill import diffusion, runs
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.denoiser import Denoiser, build_denoiser, denoiser_errors, edm_dsm_loss, label_kwargs, sample_chunked
from fdistill.evaluation.timing import timed_sampling
from fdistill.objectives.base import Objective, register


@register("score")
class ScoreObjective(Objective):
    """Trains an EDM denoiser on `config.data` with `config.model`; evaluates Heun samples."""

    def __init__(self, config):
        super().__init__(config)
        self.source = data_lib.build(config.data)
        self.denoiser = build_denoiser(config, self.source.shape)
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train))
        if config.eval.sampler not in diffusion.SAMPLERS:
            raise ConfigError(f"config.eval.sampler={config.eval.sampler!r} is not known; "
                             f"allowed: {list(diffusion.SAMPLERS)}")
        self.num_micro = ts.check_grad_accum(config.train.grad_accum_steps, config.train.batch_size)
        self.num_classes = config.model.num_classes if self.source.num_classes else 0
        self.dropout = config.model.dropout > 0

    def init_state(self, key, frozen):
        k_init, k_rng = jax.random.split(key)
        x = jnp.zeros((1,) + tuple(self.source.shape), jnp.float32)
        params = self.denoiser.init(k_init, x, **label_kwargs(self.num_classes, jnp.zeros((1,), jnp.int32)))
        return ts.create_state(params, self.optimizer, k_rng)

    def noised_inputs(self, batch, key) -> dict:
        """Per-example (x0, noise level, noise, labels) for the whole batch, drawn once so that
        gradient accumulation over micro-batches sees exactly the draws of the full batch."""
        x0 = batch["x"]
        k_level, k_noise = jax.random.split(key)
        inputs = {"x0": x0, **self.noise_level(k_level, x0.shape[0]),
                  "noise": jax.random.normal(k_noise, x0.shape, x0.dtype)}
        if self.num_classes and "label" in batch:
            inputs["labels"] = batch["label"]
        return inputs

    def noise_level(self, key, b: int) -> dict:
        """{'sigma': [b]} drawn from EDM's training distribution ln sigma ~ N(P_mean, P_std^2)."""
        d = self.config.diffusion
        return {"sigma": diffusion.sample_lognormal_sigma(key, (b,), d.p_mean, d.p_std)}

    def loss(self, params, inputs, rngs=None) -> jax.Array:
        kw = label_kwargs(self.num_classes, inputs.get("labels"))
        return jnp.mean(edm_dsm_loss(self.denoiser, params, inputs["x0"], inputs["sigma"], inputs["noise"],
                                     rngs=rngs, **kw))

    def train_step(self, state, frozen, batch):
        key = ts.step_key(state)
        inputs = self.noised_inputs(batch, key)
        rngs = ts.dropout_rngs(key) if self.dropout else None
        loss, grads = ts.value_and_grad(lambda p, x: self.loss(p, x, rngs), state.params, inputs, self.num_micro)
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, **metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.source.batch(step, self.config.train.batch_size, process_index, process_count)

    # ----- evaluation -----------------------------------------------------------------------
    def sample(self, params, key, n: int, num_steps: int | None = None, labels=None) -> np.ndarray:
        """n Heun (or Euler) samples, generated in jitted chunks."""
        e = self.config.eval
        return sample_chunked(self.denoiser, params, self.source.shape, key, n, num_steps or e.num_steps, e.sampler,
                              self.config.diffusion, e.chunk, self.num_classes, labels)

    def evaluate(self, state, frozen, key):
        e = self.config.eval
        params = ts.eval_params(state)
        x, per_sec = timed_sampling(lambda n: self.sample(params, key, n), e.num_samples)
        metrics = dict(self.source.evaluate_samples(x))
        metrics["nfe"] = float(diffusion.nfe(e.num_steps, e.sampler))
        metrics["samples_per_sec"] = per_sec
        if hasattr(self.source, "gmm"):
            metrics.update(denoiser_errors(self.denoiser, params, self.source, key))
        self._last_samples = x
        return metrics

    def plot(self, state, frozen, plot_dir, step):
        draw = lambda: self.sample(ts.eval_params(state), jax.random.key(0), min(self.config.eval.num_samples, 4096))
        return plot_samples(self, draw, plot_dir, step, f"{self.sampler_name()} samples, step {step}")

    def sampler_name(self) -> str:
        e = self.config.eval
        return f"{e.num_steps}-step {e.sampler}"


def plot_samples(objective, draw, plot_dir: str, step: int, title: str) -> list[str]:
    """`plots/samples_<step>.png` of the last evaluation's samples (`objective._last_samples`), or of
    `draw()` when the run has not been evaluated yet."""
    x = getattr(objective, "_last_samples", None)
    if x is None:
        x = draw()
    return [objective.source.plot_samples(x, os.path.join(plot_dir, f"samples_{step:07d}.png"), title)]


def load_teacher(workdir: str, field: str = "config.distill.teacher", allow_unfinished: bool = False
                 ) -> tuple[Denoiser, object, object]:
    """(Denoiser, sampling parameters, completed config) of a finished score or flow run in `workdir`."""
    run = runs.open_run(workdir, field, runs.DIFFUSION_RUNS, make_with="gmm_score", allow_unfinished=allow_unfinished)
    source_shape = data_lib.build(run.config.data).shape
    return build_denoiser(run.config, source_shape), runs.restore_params(run), run.config
