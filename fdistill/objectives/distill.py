"""f-distill and its relatives, assembled from a teacher, a critic and a student sampler.

f-distill (arXiv 2502.15681): a generator is trained so that the noised marginals q_t of its
samples match the teacher's p_t under an f-divergence. The generator gradient (Thm. 1) is the
teacher/student score difference weighted by h(r) = f''(r) r^2 of the density ratio r = p_t / q_t:

    grad_theta D_f = - E[ h(r(x_t)) (grad log p_t(x_t) - grad log q_t(x_t))^T dx_t/dtheta ],
    grad log p_t - grad log q_t = (D_real(x_t; sigma) - D_fake(x_t; sigma)) / sigma^2      (EDM).

The pieces (`fdistill.distillation`): the *teacher* gives D_real; the *critic* gives D_fake (a
fake score) and log r (a discriminator) and is trained on the student's samples; the *student
sampler* says how the generator samples and which point x an update differentiates; the
*evaluator* scores samples. One `train_step` does `distill.fake_updates_per_gen` critic updates
followed by one generator update (two time-scale rule); `state.step` counts generator updates, and
so do the three networks' learning-rate schedules (warm-up, cosine decay to 0 at train.num_steps).
The generator loss, per update (FastGen `f_distill.py` conventions, `distillation.losses`):

    x, x_t = x + sigma n        the student's training point
    r = clip(exp(clip(logit(x_t))))  normalised per noise-level bin, h = h(r) / mean h
    w = 1 / mean|x - D_real|    L_G = 0.5 mean((x - sg(x - (D_fake - D_real) w h))^2) + lambda_gan softplus(-logit)

With `distill.divergence_end` = g the weight moves from f's to g's over training,
h = (1 - p) h_f(r) / mean h_f + p h_g(r) / mean h_g with p = update / train.num_steps: a
mass-covering f would find every mode early and a mode-seeking g sharpen them late (JS -> rkl on
the 10-mode ring did not sharpen them: `experiments/results/student_quality.md`).

With `distill.lambda_reg` > 0 (one-step student only) the generator also regresses the teacher's
deterministic sample from the same noise, DMD's regression loss (arXiv 2311.18828, eq. 9; MSE here,
LPIPS there), on `distill.reg_batch_size` fresh noises per update whose ODE endpoints are computed
in the step (`teachers.ode_endpoint`, `config.eval`'s sampler):

    L_G += lambda_reg mean_z ||G(z) - ODE_teacher(sigma_max z)||^2     (mean over features)

With `distill.lambda_reg_end` set, the weight moves linearly from lambda_reg to it over training,
lambda = (1 - p) lambda_reg + p lambda_reg_end with p = update / train.num_steps (on digits a weight
falling from 0.1 to 0 lost the class weights the constant one keeps: experiments/results/digits_curve.md).

With the reverse KL (h = 1) and lambda_gan = 0 this is exactly the DMD / VSD update (no
discriminator is trained); DMD2 adds the GAN term. Three objectives, one code path:

    'distill'         the one-step student G(z) = D_gen(sigma_g z; sigma_g)
    'dmd2_multistep'  DMD2's K-step student trained by backward simulation
    'tdm'             TDM's K-step student matched segment by segment along its trajectory
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import data as data_lib
from fdistill import divergences
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.distillation import critics, evaluation, losses, students, teachers
from fdistill.evaluation.samples import MIN_EVAL_SAMPLES
from fdistill.objectives.base import Objective, register

CRITIC_SALT = 0xC1  # fold_in salt of the critic's own draws in the generator update (the oracle's samples)
REGRESSION_SALT = 0x5E  # fold_in salt of the regression loss's noises (distill.lambda_reg)


class DistillObjective(Objective):
    """One generator, its critic, a frozen teacher (see the module docstring)."""

    def __init__(self, config, student_kind: str):
        super().__init__(config)
        self.name = student_kind
        dc = config.distill
        self.dc = dc
        self.source = data_lib.build(config.data)
        self.div = divergences.from_config(dc)
        self.div_end = divergences.from_config(dc, "divergence_end") if dc.divergence_end else None
        self.critic_updates = int(dc.fake_updates_per_gen)
        if self.critic_updates < 1:
            raise ConfigError(f"config.distill.fake_updates_per_gen must be >= 1, got {self.critic_updates}")
        critics.choice(dc.critic_loop, ("scan", "unroll"), "config.distill.critic_loop")
        critics.choice(dc.ratio_binning, losses.RATIO_BINNINGS, "config.distill.ratio_binning")
        if dc.lambda_gan < 0:
            raise ConfigError(f"config.distill.lambda_gan must be >= 0, got {dc.lambda_gan}")
        if not dc.lambda_reg >= 0:  # also NaN
            raise ConfigError(f"config.distill.lambda_reg must be >= 0, got {dc.lambda_reg}")
        if dc.lambda_reg_end is not None and not dc.lambda_reg_end >= 0:
            raise ConfigError(f"config.distill.lambda_reg_end must be >= 0 (or None), got {dc.lambda_reg_end}")
        if config.eval.num_samples < MIN_EVAL_SAMPLES:
            raise ConfigError(f"config.eval.num_samples must be >= {MIN_EVAL_SAMPLES}, got {config.eval.num_samples}")
        # The discriminator is needed for a non-trivial h(r) or for the GAN term; VSD/DMD need neither.
        self.use_disc = self.div.name != "rkl" or (self.div_end is not None and self.div_end.name != "rkl") \
            or dc.lambda_gan > 0

        self.teacher = teachers.build(config, self.source)
        conditional = bool(self.source.num_classes and self.teacher.net_config.model.num_classes)
        self.levels = students.NoiseLevels(dc, config.diffusion)
        self.student = students.build(student_kind, self.teacher, self.levels, self.source.shape,
                                      self.source.num_classes, conditional, config)
        self.critic = critics.build(config, self.teacher, self.student, self.levels, self.use_disc)
        self.reg_batch = self._regression_batch(config, student_kind)
        self.optimizers = self._optimizers(config)
        if (any(o.settings.decays for o in self.optimizers.values()) or self.levels.hi_end is not None
                or self.div_end is not None or (self.reg_batch and dc.lambda_reg_end is not None)):
            # the learning rate decays to 0, the noise range, the divergence or the regression weight moves,
            # by num_steps
            self.trajectory_fields = ("train.num_steps",)
        if self.reg_batch:  # the regression targets' sampler (as for kd): must not change on resume
            self.trajectory_fields = (*self.trajectory_fields, "eval.num_steps", "eval.sampler")
        label = f"{self.student.num_steps}-step {student_kind} ({self.div.name})"
        self.evaluator = evaluation.Evaluator(config, self.source, self.teacher, self.student, self.critic, label)

    def _regression_batch(self, config, student_kind: str) -> int:
        """The noises per update of DMD's regression loss (0 = none: lambda_reg 0, lambda_reg_end unset or 0)."""
        dc = config.distill
        if dc.lambda_reg == 0 and not dc.lambda_reg_end:
            return 0
        what = f"config.distill.lambda_reg={dc.lambda_reg}" + (
            f" (lambda_reg_end={dc.lambda_reg_end})" if dc.lambda_reg_end is not None else "")
        if student_kind != "distill":
            raise ConfigError(f"{what} needs the one-step student (objective "
                              f"'distill'), not {student_kind!r}; set it to 0")
        if dc.gen_sigma != config.diffusion.sigma_max:
            raise ConfigError(f"{what} needs a generator that maps the ODE's "
                              f"starting noise: config.distill.gen_sigma={dc.gen_sigma} must equal "
                              f"config.diffusion.sigma_max={config.diffusion.sigma_max}")
        if not self.student.plain:
            raise ConfigError(f"{what} needs a z of the data's shape, the ODE's "
                              f"starting noise ({students.DATA_SHAPED_FLAGS})")
        if not isinstance(dc.reg_batch_size, (int, np.integer)) or dc.reg_batch_size < 1:
            raise ConfigError(f"config.distill.reg_batch_size must be an integer >= 1, got {dc.reg_batch_size!r}")
        return int(dc.reg_batch_size)

    def regression_weight(self, progress):
        """The regression loss's weight at `progress` (update / train.num_steps; module docstring)."""
        dc = self.dc
        if dc.lambda_reg_end is None:
            return dc.lambda_reg
        return (1.0 - progress) * dc.lambda_reg + progress * dc.lambda_reg_end

    def regression_draws(self, key, frozen) -> dict:
        """Fresh noises, labels and the teacher's ODE endpoints (stop-gradient) of DMD's regression loss."""
        k_z, k_lab = jax.random.split(key)
        z = jax.random.normal(k_z, (self.reg_batch,) + self.student.latent_shape)
        labels = self.student.draw_labels(k_lab, self.reg_batch)
        target = teachers.ode_endpoint(self.teacher, frozen["teacher"], z, self.student.kw(labels), self.config.eval,
                                       self.config.diffusion)
        return {"z": z, "labels": labels, "target": jax.lax.stop_gradient(target)}

    def _optimizers(self, config) -> dict[str, ts.Optimizer]:
        """AdamW of the generator and of the two critics. Every schedule is counted in generator updates:
        a critic's optimiser steps `fake_updates_per_gen` times per generator update (`updates_per_step`),
        so all three rates reach 0 at the run's last update."""
        dc = config.distill
        opt = lambda **kw: ts.Optimizer(ts.OptimizerSettings.from_config(config.train, **kw))  # noqa: E731
        critic = {"updates_per_step": self.critic_updates, "grad_clip": dc.critic_grad_clip, "ema_decay": 0.0}
        return {"gen": opt(learning_rate=dc.lr_gen, lr_schedule=dc.gen_lr_schedule, ema_decay=dc.gen_ema_decay),
                "fake": opt(learning_rate=dc.lr_fake, **critic),
                "disc": opt(learning_rate=dc.lr_disc, **critic)}

    # ----- contract --------------------------------------------------------------------------
    def frozen(self):
        return {"teacher": self.teacher.frozen()}

    def init_state(self, key, frozen):
        k_gen, k_critic, k_rng = jax.random.split(key, 3)
        if self.teacher.starts_students:  # DMD2: the generator starts from the teacher
            gen = jax.tree.map(jnp.array, frozen["teacher"])
        else:
            gen = self.student.init(k_gen)
        params = {"gen": gen, **self.critic.init(k_critic, frozen["teacher"])}
        extra = {"ratio_bins": jnp.ones((max(int(self.dc.ratio_bins), 1),), jnp.float32)}
        return ts.create_state(params, self.optimizers, k_rng, extra)

    def batch(self, step, process_index=0, process_count=1):
        """One real batch per critic update, stacked on axis 1: {'x': [B, fake_updates_per_gen, ...]}."""
        n = self.critic_updates
        parts = [self.source.batch(step * n + k, self.config.train.batch_size, process_index, process_count)
                 for k in range(n)]
        return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0] if k in ("x", "label")}

    # ----- the generator loss ----------------------------------------------------------------
    def generator_loss(self, gen_params, params, frozen, draws, bins):
        """The f-distill generator loss (module docstring); returns (loss, (metrics, new_bins, pieces))."""
        dc = self.dc
        point = self.student.train_point(gen_params, draws)
        x, sigma, labels, step = point["x"], point["sigma"], point["labels"], point["step"]
        x_t = x + point["noise"] * sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
        d_real = jax.lax.stop_gradient(self.teacher(frozen["teacher"], x_t, sigma, **self.student.kw(labels)))
        metrics = {}
        logits, d_fake = self.critic.generator_terms(params, frozen["teacher"], x_t, sigma, labels, step,
                                                     draws.get("critic_key"), self.use_disc)
        if self.use_disc:
            r = losses.ratio_from_logits(jax.lax.stop_gradient(logits), dc.logit_clip, dc.ratio_min, dc.ratio_max)
            if dc.ratio_bins > 0:
                d = self.config.diffusion
                bin_idx = losses.ratio_bin_index(dc.ratio_binning, int(dc.ratio_bins), point["index"], sigma,
                                                  self.levels.lo, self.levels.hi, d.sigma_min, d.sigma_max)
                r_n, bins = losses.bin_normalize(r, bin_idx, bins, dc.ratio_ema)
            else:
                r_n = r
            h = losses.normalized_h(self.div, r_n)
            if self.div_end is not None:
                p = draws["progress"]
                h = (1.0 - p) * h + p * losses.normalized_h(self.div_end, r_n)
            l_gan = losses.gan_generator_loss(logits)
            metrics.update({"r/mean": jnp.mean(r), "r/min": jnp.min(r), "r/max": jnp.max(r)})
        else:
            h = jnp.ones(x.shape[:1], jnp.float32)
            l_gan = jnp.zeros((), jnp.float32)
        d_fake = jax.lax.stop_gradient(d_fake)
        if dc.teacher_error_norm:
            w = jax.lax.stop_gradient(losses.teacher_error_weight(x, d_real))
        else:
            w = jnp.ones(x.shape[:1], jnp.float32)
        l_dm = losses.dm_loss(x, d_real, d_fake, h, w)
        loss = l_dm + dc.lambda_gan * l_gan
        if "regression" in draws:
            reg = draws["regression"]
            l_reg = jnp.mean((self.student.sample(gen_params, reg["z"], reg["labels"]) - reg["target"]) ** 2)
            weight = self.regression_weight(draws["progress"])
            loss = loss + weight * l_reg
            metrics.update({"loss_reg": l_reg, "lambda_reg": jnp.asarray(weight, jnp.float32)})
        metrics.update({"loss_dm": l_dm, "loss_gan": l_gan, "h/min": jnp.min(h), "h/mean": jnp.mean(h),
                        "h/max": jnp.max(h)})
        return loss, (metrics, bins, {"x": x, "x_t": x_t, "d_real": d_real, "d_fake": d_fake, "h": h, "w": w})

    # ----- the step --------------------------------------------------------------------------
    def progress(self, state) -> jax.Array:
        """The fraction of training done (update / train.num_steps): the noise range's position
        when it moves (`distill.gen_index_max_end`, `students.NoiseLevels`) and the weight of
        `distill.divergence_end` in h."""
        return state.step / max(int(self.config.train.num_steps), 1)

    def critic_update(self, state, frozen, x_real, labels_real, key):
        """One critic update on fresh stop-gradient student training points and one real batch."""
        k_point, k_loss = jax.random.split(key)
        gen = jax.lax.stop_gradient(state.params["gen"])
        progress = self.progress(state)
        point = {**self.student.train_point(gen, self.student.draws(k_point, x_real.shape[0], progress)),
                 "progress": progress}

        def loss_fn(critic_params):
            params = {**state.params, **critic_params}
            return self.critic.loss(params, frozen["teacher"], point, x_real, labels_real, k_loss)

        critic_params = {k: state.params[k] for k in ("fake", "disc")}
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(critic_params)
        state, opt_metrics = ts.apply_gradients(state, grads, self.optimizers)
        return state, {**metrics, "grad_norm/fake": opt_metrics["grad_norm/fake"]}

    def train_step(self, state, frozen, batch):
        key = ts.step_key(state)
        k_critic, k_gen = jax.random.split(key)
        x_real = jnp.moveaxis(batch["x"], 1, 0)  # [critic_updates, B, ...]
        b = x_real.shape[1]
        labels_real = (jnp.moveaxis(batch["label"], 1, 0) if "label" in batch
                       else jnp.zeros((self.critic_updates, b), jnp.int32))
        keys = jax.random.split(k_critic, self.critic_updates)
        if not self.critic.learned:  # an exact critic: nothing to update
            critic_metrics = {}
        elif self.dc.critic_loop == "scan":
            state, critic_metrics = jax.lax.scan(lambda s, inp: self.critic_update(s, frozen, *inp), state,
                                                 (x_real, labels_real, keys))
        else:  # Python-unrolled (conv gradients inside scan are slow on CPU)
            per_update = []
            for i in range(self.critic_updates):
                state, m = self.critic_update(state, frozen, x_real[i], labels_real[i], keys[i])
                per_update.append(m)
            critic_metrics = jax.tree.map(lambda *a: jnp.stack(a), *per_update)
        critic_metrics = {k: jnp.mean(v) for k, v in critic_metrics.items()}

        progress = self.progress(state)
        draws = {**self.student.draws(k_gen, b, progress), "progress": progress,
                 "critic_key": jax.random.fold_in(k_gen, CRITIC_SALT)}
        if self.reg_batch:
            draws["regression"] = self.regression_draws(jax.random.fold_in(k_gen, REGRESSION_SALT), frozen)
        (loss, (metrics, bins, _)), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
            state.params["gen"], state.params, frozen, draws, state.extra["ratio_bins"])
        state, opt_metrics = ts.apply_gradients(state, {"gen": grads}, self.optimizers)
        metrics = {"loss": loss, "loss_gen": loss, **metrics, **critic_metrics,
                   "grad_norm/gen": opt_metrics["grad_norm/gen"], "update_norm/gen": opt_metrics["update_norm/gen"]}
        return state.replace(step=state.step + 1, extra={"ratio_bins": bins}), metrics

    # ----- evaluation ------------------------------------------------------------------------
    def sampling_params(self, state):
        return ts.eval_params(state, "gen")

    def evaluate(self, state, frozen, key):
        m = self.evaluator.evaluate(state.params, self.sampling_params(state), frozen, key, self.cache)
        if self.student.num_steps > 1:
            m["num_student_steps"] = float(self.student.num_steps)
        return m

    def plot(self, state, frozen, plot_dir, step):
        return self.evaluator.plot(self.sampling_params(state), plot_dir, step)


def _objective(student_kind: str):
    def build(config) -> DistillObjective:
        return DistillObjective(config, student_kind)

    build.__doc__ = f"The distillation objective with the {students.STUDENTS[student_kind].__name__} student."
    return build


for _name in students.STUDENTS:
    register(_name, family="distill")(_objective(_name))
