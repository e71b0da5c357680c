"""The frozen teacher of a distillation: the exact mixture denoiser or a finished score run.

A teacher gives the real denoiser D_real(x_t; sigma) = E_p[x_0 | x_t] (the teacher's score is
(D_real - x_t) / sigma^2), samples for the reference metrics, and the network architecture (and
possibly the initial weights) of the generator and the fake score. Its parameters travel in
`frozen['teacher']`: an argument of the jitted step, never a closed-over constant.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from fdistill import diffusion, runs
from fdistill.configs import ConfigError
from fdistill.denoiser import build_denoiser, sample_chunked


class AnalyticTeacher:
    """The exact GMM denoiser (`config.distill.teacher='analytic'`; GMM data only). The student's
    networks use `config.model`; the generator and fake score start from random weights."""

    has_features = False

    def __init__(self, config, source):
        if config.data.name != "gmm":
            raise ConfigError(f"config.distill.teacher='analytic' needs config.data.name='gmm' (got "
                             f"{config.data.name!r}); for other data pass the workdir of a finished 'score' run")
        self.source = source
        self.net_config = config
        self.denoiser = build_denoiser(config, source.shape)
        self.sigma_data = self.denoiser.sigma_data
        self.starts_students = False  # fresh generator and fake score
        self.name = "analytic"

    def frozen(self):
        return self.source.gmm

    def __call__(self, gmm, x: jax.Array, sigma: jax.Array, **kw) -> jax.Array:
        """D_real in the `Denoiser` calling convention (`gmm` is `frozen['teacher']`)."""
        return gmm.denoise(x, sigma)

    def features(self, frozen_teacher, x_t, sigma, **kw):
        raise ConfigError("config.distill.disc_on='teacher' needs a network teacher (a score run's workdir in "
                         "config.distill.teacher); the analytic mixture has no features")


class ScoreRunTeacher:
    """The EMA network of a finished `score` run (`config.distill.teacher=<workdir>`). Its config
    defines the student networks' architecture, and its weights initialise the generator and the
    fake score (DMD2). The student's `config.model` and `config.train.compute_dtype` are replaced by
    the teacher's (`adopt_architecture`), so the student's recorded config.json names the
    architecture actually trained; the fields that changed are printed at start."""

    has_features = True

    def __init__(self, config, source):
        workdir = config.distill.teacher
        if not isinstance(workdir, str) or not os.path.isdir(os.path.expanduser(workdir)):
            raise ConfigError(f"config.distill.teacher={workdir!r} must be 'analytic' or the workdir of a finished "
                             "'score' run")
        run = runs.open_dependency(config, "distill.teacher")  # finished, same data and diffusion
        self.denoiser = build_denoiser(run.config, source.shape)
        tconfig = run.config
        self.net_config = tconfig
        self.sigma_data = self.denoiser.sigma_data
        self.starts_students = True  # the generator and fake score start from its weights (frozen['teacher'])
        self._params = runs.stored_params(run)  # read onto its shardings by the loop
        self.name = workdir
        replaced = adopt_architecture(config, tconfig)
        if replaced:
            print(f"[fdistill] the generator and fake score copy the teacher's architecture ({workdir}); the "
                  f"student's config now records it: {replaced}", flush=True)

    def frozen(self):
        return self._params

    def __call__(self, params, x: jax.Array, sigma: jax.Array, **kw) -> jax.Array:
        return self.denoiser(params, x, sigma, **kw)

    def features(self, params, x_t, sigma, **kw):
        """Hidden features of the frozen teacher network at (x_t, sigma) (FastGen's discriminator input)."""
        return self.denoiser.with_features(params, x_t, sigma, **kw)[1]


def adopt_architecture(config, teacher_config) -> str:
    """Replaces the student's `config.model` and `config.train.compute_dtype` by the teacher's (the
    networks are built from the teacher's config); returns the student fields that changed, as
    'model.width=64 -> 32, ...' ('' when none)."""
    ours, theirs = config.model.to_dict(), teacher_config.model.to_dict()
    changed = [f"model.{k}={ours.get(k)!r} -> {theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
               if ours.get(k) != theirs.get(k)]
    if config.train.compute_dtype != teacher_config.train.compute_dtype:
        changed.append(f"train.compute_dtype={config.train.compute_dtype!r} -> {teacher_config.train.compute_dtype!r}")
    config.model = teacher_config.model.copy_and_resolve_references()
    config.train.compute_dtype = teacher_config.train.compute_dtype
    return ", ".join(changed)


def build(config, source):
    """The teacher named by `config.distill.teacher`."""
    if config.distill.teacher == "analytic":
        return AnalyticTeacher(config, source)
    return ScoreRunTeacher(config, source)


def sample(teacher, frozen_teacher, shape, key, n: int, eval_config, diffusion_config, num_classes: int,
           labels=None) -> np.ndarray:
    """n deterministic samples of the teacher's probability-flow ODE (Heun/Euler, `config.eval`)."""
    return sample_chunked(teacher, frozen_teacher, shape, key, n, eval_config.num_steps, eval_config.sampler,
                          diffusion_config, eval_config.chunk, num_classes, labels)


def ode_endpoint(teacher, frozen_teacher, z, kw: dict, eval_config, diffusion_config) -> jax.Array:
    """The teacher's deterministic sample from the noise sigma_max z (EDM Algorithm 1 with
    `config.eval`'s sampler and steps): the regression target of knowledge distillation (Luhman &
    Luhman, arXiv 2101.02388) and of DMD's regression loss (arXiv 2311.18828, eq. 9). `kw` holds
    the teacher's keyword arguments (the labels of a conditional teacher)."""
    d = diffusion_config
    return diffusion.sample(lambda x, s: teacher(frozen_teacher, x, s, **kw), z, eval_config.num_steps,
                            sampler=eval_config.sampler, sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=d.rho)
