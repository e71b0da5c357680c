"""Reward optimisation of a diffusion sampler by policy gradient: the pieces FIND and DDPO share.

* The clipped surrogate of PPO (Schulman et al., arXiv 1707.06347, eq. 7), as DDPO (arXiv
  2305.13301, eq. 4 with clipping) and FIND (arXiv 2407.19453, ratio clipping) use it, per action:

      L(theta) = -mean min( rho A, clip(rho, 1 - eps, 1 + eps) A ),   rho = pi_theta(a) / pi_old(a),

  whose gradient at rho = 1 is the plain policy gradient -mean A grad log pi_theta(a) (REINFORCE).
* Advantages: the rewards minus a baseline, divided by their standard deviation over the batch or
  over each class's samples (`config.rl.advantage_norm`).
* The frozen sampler x = G(z, label) (`open_sampler`): the deterministic ODE sampler of a finished
  score/flow run (Heun or Euler on the EDM levels, `config.rl.sampler_steps`) or the generator of a
  finished distillation run (one network call for a one-step student), named by `config.rl.sampler`.
* `RewardObjective`: the common part of the objectives (config checks, the reward and its frozen
  part, the per-step batch of initial noise drawn on the host, evaluation against the reference
  with the same initial noise, plots).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from fdistill import data as data_lib
from fdistill import diffusion, runs
from fdistill.configs import ConfigError
from fdistill.data import diffusion_preference as prefdata
from fdistill.denoiser import build_denoiser, label_kwargs, sample_in_chunks
from fdistill.objectives.base import Objective
from fdistill.sharding import process_slice

ADVANTAGE_NORMS = ("batch", "class", "none")


# ----------------------------------------------------------------------------------------------
# Policy-gradient losses
# ----------------------------------------------------------------------------------------------
def clipped_surrogate(logp: jax.Array, logp_old: jax.Array, advantage: jax.Array, clip_eps: float):
    """(per-action loss -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho, clipped indicator)."""
    rho = jnp.exp(logp - logp_old)
    unclipped = rho * advantage
    clipped = jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
    return -jnp.minimum(unclipped, clipped), rho, (jnp.abs(rho - 1.0) > clip_eps).astype(jnp.float32)


def normalize_advantages(adv: jax.Array, labels: jax.Array, num_classes: int, mode: str,
                         weight: jax.Array | None = None) -> jax.Array:
    """A / (std + 1e-6) over the batch ('batch') or over each class's rows ('class'; DDPO's per-prompt
    statistics), or A unchanged ('none'). `weight` (0/1 per row) excludes rows from the statistics."""
    if mode == "none":
        return adv
    w = jnp.ones_like(adv) if weight is None else weight
    if mode == "batch" or num_classes <= 1:
        var = jnp.sum(w * (adv - jnp.sum(w * adv) / jnp.sum(w)) ** 2) / jnp.maximum(jnp.sum(w), 1.0)
        return adv / (jnp.sqrt(var) + 1e-6)
    onehot = jax.nn.one_hot(labels, num_classes) * w[:, None]
    count = jnp.maximum(onehot.sum(0), 1.0)
    mean = (onehot * adv[:, None]).sum(0) / count
    var = (onehot * (adv[:, None] - mean) ** 2).sum(0) / count
    return adv / (jnp.sqrt(var)[labels] + 1e-6)


def group_mean(values: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Each row's class mean of `values` [B] (the batch mean when there are no classes)."""
    if num_classes <= 1:
        return jnp.broadcast_to(jnp.mean(values), values.shape)
    onehot = jax.nn.one_hot(labels, num_classes)
    means = (onehot * values[:, None]).sum(0) / jnp.maximum(onehot.sum(0), 1.0)
    return means[labels]


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """log N(x; mean, diag exp(2 log_std)), summed over the trailing axes of x [B, ...]."""
    axes = tuple(range(1, x.ndim))
    z = (x - mean) * jnp.exp(-log_std)
    lp = -0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    return jnp.sum(jnp.broadcast_to(lp, x.shape), axis=axes)


def check_rl_config(config) -> None:
    """Fails at start-up naming the bad `config.rl` field and what it allows."""
    r = config.rl
    if not 0 < r.clip_eps < 1:
        raise ConfigError(f"config.rl.clip_eps must be in (0, 1), got {r.clip_eps}")
    if r.advantage_norm not in ADVANTAGE_NORMS:
        raise ConfigError(f"config.rl.advantage_norm={r.advantage_norm!r} is not known; allowed: {list(ADVANTAGE_NORMS)}")
    if r.sampler_steps < 0:
        raise ConfigError(f"config.rl.sampler_steps must be >= 0 (0 = the sampler run's eval.num_steps), "
                         f"got {r.sampler_steps}")


# ----------------------------------------------------------------------------------------------
# The frozen sampler
# ----------------------------------------------------------------------------------------------
class ODESampler:
    """x = ODE(sigma_max z): the deterministic EDM sampler (Heun or Euler, `steps` Karras levels) of
    a finished score or flow run's denoiser (a flow run's velocity converts exactly)."""

    def __init__(self, run: runs.FinishedRun, shape, steps: int, sampler: str, num_classes: int):
        self.config = run.config
        self.denoiser = build_denoiser(run.config, shape)
        self.params = runs.stored_params(run)  # read onto its shardings by the loop
        self.latent_shape, self.num_classes = tuple(shape), num_classes
        self.steps, self.sampler = int(steps), sampler
        self.nfe = diffusion.nfe(self.steps, sampler)
        self.name = f"{self.nfe}-NFE {sampler} ODE"

    def frozen(self):
        return self.params

    def __call__(self, params, z: jax.Array, labels=None) -> jax.Array:
        d, kw = self.config.diffusion, label_kwargs(self.num_classes, labels)
        return diffusion.sample(lambda x, s: self.denoiser(params, x, s, **kw), z, self.steps, sampler=self.sampler,
                                sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=d.rho)


class StudentSampler:
    """x = G(z): the generator of a finished distillation run (its EMA when it keeps one); a
    one-step student is one network call per sample."""

    def __init__(self, run: runs.FinishedRun, source):
        from fdistill.distillation import students, teachers

        cfg = run.config.copy_and_resolve_references()
        teacher = teachers.build(cfg, source)
        conditional = bool(source.num_classes and teacher.net_config.model.num_classes)
        levels = students.NoiseLevels(cfg.distill, cfg.diffusion)
        kind = "distill" if cfg.objective == "kd" else cfg.objective
        self.student = students.build(kind, teacher, levels, source.shape, source.num_classes, conditional, cfg)
        self.params = runs.stored_generator(run)
        self.config = cfg
        self.latent_shape = tuple(self.student.latent_shape)
        self.num_classes = source.num_classes if conditional else 0
        self.nfe = int(self.student.num_steps)
        self.name = f"{self.nfe}-step {cfg.objective} student"

    def frozen(self):
        return self.params

    def __call__(self, params, z: jax.Array, labels=None) -> jax.Array:
        return self.student.sample(params, z, labels)


def open_sampler(config, source):
    """The frozen sampler named by `config.rl.sampler` (a finished score/flow or distillation run
    with this config's data, model and diffusion sections)."""
    run = runs.open_dependency(config, "rl.sampler")
    if run.config.objective in runs.DIFFUSION_RUNS:
        num_classes = source.num_classes if (source.num_classes and run.config.model.num_classes) else 0
        steps = config.rl.sampler_steps or run.config.eval.num_steps
        return ODESampler(run, source.shape, steps, run.config.eval.sampler, num_classes)
    return StudentSampler(run, source)


# ----------------------------------------------------------------------------------------------
# The common objective
# ----------------------------------------------------------------------------------------------
class RewardObjective(Objective):
    """The common part of FIND and DDPO (see the module docstring). Subclasses set
    `self.latent_shape`, `self.num_classes` and implement `noise_batch(rng, b)` (the host-drawn
    randomness of one step), `eval_fn(policy)` (a jitted sampler `fn(args, noise, labels)` with its
    `args`; `policy=None` gives the reference) and the training."""

    def __init__(self, config):
        super().__init__(config)
        check_rl_config(config)
        self.source = data_lib.build(config.data)
        self.reward = prefdata.build_reward(config.reward, self.source)
        self.alignment = prefdata.AlignmentEvaluator(self.source, self.reward)

    def batch(self, step, process_index=0, process_count=1):
        """This process's rows of step `step`'s initial noise and labels (a function of the seed and
        the step only, so any device or process count follows the same trajectory)."""
        b = int(self.config.train.batch_size)
        rng = np.random.default_rng([int(self.config.train.seed), 9, int(step)])
        out = self.noise_batch(rng, b)
        out["labels"] = rng.integers(0, max(self.num_classes, 1), b).astype(np.int32)
        rows = process_slice(b, process_index, process_count)
        return {k: v[rows] for k, v in out.items()}

    def noise_batch(self, rng: np.random.Generator, b: int) -> dict:
        raise NotImplementedError

    # ----- evaluation -----------------------------------------------------------------------
    def eval_fn(self, state, frozen):
        """(jitted fn(args, noise, labels) -> x, args) of the trained sampler (`state`) or the
        reference (`state=None`)."""
        raise NotImplementedError

    def eval_samples(self, state, frozen, key, n: int) -> np.ndarray:
        fn, args = self.eval_fn(state, frozen)
        return sample_in_chunks(fn, args, key, n, int(self.config.eval.chunk), self.latent_shape,
                                self.num_classes)[0]

    def evaluate(self, state, frozen, key):
        """The alignment metrics (`prefdata.AlignmentEvaluator`; the reference: the same sampler before
        training, from the same initial noise) and the reward evaluations used."""
        n = int(self.config.eval.num_samples)
        metrics = self.alignment.evaluate(lambda m: self.eval_samples(state, frozen, key, m),
                                          lambda m: self.eval_samples(None, frozen, key, m), key, n)
        metrics["reward_evals"] = float(int(state.step) * int(self.config.train.batch_size))
        return metrics

    def plot(self, state, frozen, plot_dir, step):
        return self.alignment.plot(plot_dir, step, f"{self.name}, {self.config.reward.kind}, step {step}",
                                   "reference (before reward optimisation)",
                                   lambda m: self.eval_samples(state, frozen, jax.random.PRNGKey(0), m),
                                   int(self.config.eval.num_samples))
