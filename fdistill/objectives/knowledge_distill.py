"""Knowledge distillation on the teacher's ODE endpoints (Luhman & Luhman 2021, arXiv 2101.02388).

The one-step student G(z) = D_gen(sigma_max z; sigma_max) regresses, from the same noise, the end
point of the teacher's deterministic sampler (EDM Algorithm 1, arXiv 2206.00364; Heun or Euler with
`config.eval.num_steps` steps, the sampler the teacher is evaluated with):

    L(theta) = E_z || G_theta(z) - ODE_teacher(sigma_max z) ||^2   (mean over features).

Luhman & Luhman precompute a dataset of (z, endpoint) pairs and use a perceptual loss on images;
here the endpoints are computed in the step (cheap for the analytic mixture) and the loss is the MSE.
Assembled from the distillation pieces: the teacher (`distillation.teachers`), the one-step student
(`distillation.students.OneStep`) and the evaluator; no critic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fdistill import data as data_lib
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.distillation import evaluation, students, teachers
from fdistill.objectives.base import Objective, register


@register("kd", family="distill")
class KnowledgeDistillation(Objective):
    trajectory_fields = ("eval.num_steps", "eval.sampler")  # the regression targets' sampler

    def __init__(self, config):
        super().__init__(config)
        self.source = data_lib.build(config.data)
        self.teacher = teachers.build(config, self.source)
        conditional = bool(self.source.num_classes and self.teacher.net_config.model.num_classes)
        levels = students.NoiseLevels(config.distill, config.diffusion)
        self.student = students.build("distill", self.teacher, levels, self.source.shape, self.source.num_classes,
                                      conditional, config)
        if config.distill.gen_sigma != config.diffusion.sigma_max:
            raise ConfigError(f"config.distill.gen_sigma={config.distill.gen_sigma} must equal config.diffusion."
                             f"sigma_max={config.diffusion.sigma_max}: the student maps the ODE's starting noise")
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train, learning_rate=config.distill.lr_gen))
        self.evaluator = evaluation.Evaluator(config, self.source, self.teacher, self.student, None, "1-step kd")

    def frozen(self):
        return {"teacher": self.teacher.frozen()}

    def init_state(self, key, frozen):
        k_gen, k_rng = jax.random.split(key)
        if self.teacher.starts_students:
            gen = jax.tree.map(jnp.array, frozen["teacher"])
        else:
            gen = self.student.init(k_gen)
        return ts.create_state(gen, self.optimizer, k_rng)

    def ode_endpoint(self, frozen_teacher, z, labels) -> jax.Array:
        """The teacher's deterministic sample from the noise sigma_max z."""
        return teachers.ode_endpoint(self.teacher, frozen_teacher, z, self.student.kw(labels), self.config.eval,
                                     self.config.diffusion)

    def loss(self, gen_params, frozen, z, labels) -> jax.Array:
        target = jax.lax.stop_gradient(self.ode_endpoint(frozen["teacher"], z, labels))
        return jnp.mean((self.student.sample(gen_params, z, labels) - target) ** 2)

    def train_step(self, state, frozen, batch):
        b = batch["x"].shape[0]  # only the batch size: KD needs no data, only the teacher
        k_z, k_lab = jax.random.split(ts.step_key(state))
        z = jax.random.normal(k_z, (b,) + self.student.latent_shape)
        labels = self.student.draw_labels(k_lab, b)
        loss, grads = jax.value_and_grad(self.loss)(state.params, frozen, z, labels)
        state, metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {"loss": loss, **metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.source.batch(step, self.config.train.batch_size, process_index, process_count)

    def evaluate(self, state, frozen, key):
        return self.evaluator.evaluate(state.params, ts.eval_params(state), frozen, key, self.cache)

    def plot(self, state, frozen, plot_dir, step):
        return self.evaluator.plot(ts.eval_params(state), plot_dir, step)
