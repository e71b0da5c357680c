"""FIND: fine-tuning the initial noise distribution of a frozen sampler by policy optimisation
(Chen et al., arXiv 2407.19453).

The sampler G (a score/flow run's deterministic ODE sampler, or a distilled one- or few-step
generator; `policy_gradient.open_sampler`) stays frozen. Sampling is a one-step MDP: the state is
the class c (the prompt), the action the initial noise z, the reward r(G(z, c)). The policy is

    pi_theta(z | c) = N(z; mu_c, diag sigma_c^2),   theta = (mu, log sigma) per class,   mu = 0, sigma = 1 at start,

so the untrained policy is the sampler's own N(0, I). Each step draws z = mu_c + sigma_c eps for a
batch (eps on the host: `batch`), evaluates the rewards, stores (z, c, r, log pi_old(z | c)) in a
replay of the last `rl.replay` batches (state.extra), and makes one update of

    * the dynamic reward calibration (`rl.baseline='calibration'`): b_phi(c), the expected reward of
      the current distribution for class c, regressed on this batch: L_phi = mean (b_phi(c) - r)^2;
    * the policy, on every replayed row, with the ratio-clipped objective (`policy_gradient.clipped_surrogate`)
      on the advantages A = r - b_phi(c) (normalised, `rl.advantage_norm`), plus
      kl_weight * mean_c KL(pi_theta(. | c) || N(0, I)) (summed over latent dimensions), which keeps
      z where the sampler was trained and gives the optimum a closed form for a linear reward on an
      identity sampler: mu = a / kl_weight, sigma = 1 (tested).

The calibration's baseline does not depend on z, so it leaves the policy gradient unbiased (tested);
it lowers its variance. The replay rows were drawn by older policies: their ratio pi_theta / pi_old
is what the clipping bounds, so stale rows cannot move the policy far (the paper's ratio clipping).
One step = `train.batch_size` reward evaluations (`reward_evals` in results.json).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.objectives import policy_gradient as pg
from fdistill.objectives.base import register

BASELINES = ("calibration", "batch_mean", "none")


def kl_to_prior(mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """KL(N(mean, exp(2 log_std)) || N(0, I)) per row [C], summed over the latent axes."""
    axes = tuple(range(1, mean.ndim))
    return jnp.sum(0.5 * (mean**2 + jnp.exp(2 * log_std) - 1.0) - log_std, axis=axes)


def init_params(num_rows: int, latent_shape) -> dict:
    """{'policy': {'mean': 0, 'log_std': 0} (N(0, I)) per class row, 'calib': {'value': 0} per row}."""
    shape = (num_rows,) + tuple(latent_shape)
    return {"policy": {"mean": jnp.zeros(shape, jnp.float32), "log_std": jnp.zeros(shape, jnp.float32)},
            "calib": {"value": jnp.zeros((num_rows,), jnp.float32)}}


def init_replay(size: int, batch: int, latent_shape) -> dict:
    """An empty replay of `size` batches (rows with valid = 0 take no part)."""
    return {"z": jnp.zeros((size, batch) + tuple(latent_shape)), "labels": jnp.zeros((size, batch), jnp.int32),
            "reward": jnp.zeros((size, batch)), "logp_old": jnp.zeros((size, batch)), "valid": jnp.zeros((size, batch))}


def policy_loss(policy, rows: dict, advantage: jax.Array, clip_eps: float, kl_weight: float, num_rows: int):
    """(loss, metrics): the valid-weighted clipped surrogate over the replayed rows plus kl_weight
    times the mean KL to N(0, I) over the classes that have rows."""
    mean, log_std = policy["mean"][rows["labels"]], policy["log_std"][rows["labels"]]
    logp = pg.gaussian_log_prob(rows["z"], mean, log_std)
    per_row, rho, clipped = pg.clipped_surrogate(logp, rows["logp_old"], advantage, clip_eps)
    w = rows["valid"]
    n = jnp.maximum(jnp.sum(w), 1.0)
    surrogate = jnp.sum(w * per_row) / n
    kl = kl_to_prior(policy["mean"], policy["log_std"])
    used = (jnp.zeros((num_rows,)).at[rows["labels"]].max(w) > 0).astype(jnp.float32)
    kl_mean = jnp.sum(used * kl) / jnp.maximum(jnp.sum(used), 1.0)
    loss = surrogate + kl_weight * kl_mean
    return loss, {"surrogate": surrogate, "kl_to_prior": kl_mean, "clip_frac": jnp.sum(w * clipped) / n,
                  "ratio_max": jnp.max(jnp.where(w > 0, rho, 0.0))}


def find_step(state, frozen, batch, *, sample_fn, reward_fn, optimizers, clip_eps: float, kl_weight: float,
              baseline: str, advantage_norm: str, num_rows: int):
    """One FIND update (module docstring) of `state` on `batch` = {'eps', 'labels'}: pure, jittable.

    `sample_fn(frozen['sampler'], z, labels) -> x` and `reward_fn(frozen['reward'], x) -> r` are the
    frozen sampler and the reward; `optimizers` = {'policy', 'calib'}.
    """
    eps, labels = batch["eps"], batch["labels"]
    policy = state.params["policy"]
    mean, log_std = policy["mean"][labels], policy["log_std"][labels]
    z = jax.lax.stop_gradient(mean + jnp.exp(log_std) * eps)
    reward = reward_fn(frozen["reward"], jax.lax.stop_gradient(sample_fn(frozen["sampler"], z, labels)))
    logp_old = jax.lax.stop_gradient(pg.gaussian_log_prob(z, mean, log_std))
    replay = state.extra["replay"]
    slot = state.step % replay["valid"].shape[0]
    new = {"z": z, "labels": labels, "reward": reward, "logp_old": logp_old, "valid": jnp.ones_like(reward)}
    replay = jax.tree.map(lambda buf, v: buf.at[slot].set(v.astype(buf.dtype)), replay, new)

    # The dynamic reward calibration: b(c) regressed on this batch's rewards.
    calib_fn = lambda cp: jnp.mean((cp["value"][labels] - reward) ** 2)
    calib_loss, g_calib = jax.value_and_grad(calib_fn)(state.params["calib"])
    state, m_calib = ts.apply_gradients(state, {"calib": g_calib}, optimizers)

    rows = jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), replay)
    if baseline == "calibration":
        b = state.params["calib"]["value"][rows["labels"]]
    elif baseline == "batch_mean":
        b = jnp.mean(reward)
    else:
        b = 0.0
    adv = pg.normalize_advantages(rows["reward"] - b, rows["labels"], num_rows, advantage_norm, rows["valid"])
    adv = jax.lax.stop_gradient(adv)
    loss_fn = lambda p: policy_loss(p, rows, adv, clip_eps, kl_weight, num_rows)
    (loss, m_policy), g_policy = jax.value_and_grad(loss_fn, has_aux=True)(state.params["policy"])
    state, m_opt = ts.apply_gradients(state, {"policy": g_policy}, optimizers)
    p = state.params["policy"]
    metrics = {"loss": loss, "reward": jnp.mean(reward), "calib_loss": calib_loss, **m_policy, **m_calib, **m_opt,
               "policy_std": jnp.mean(jnp.exp(p["log_std"])), "policy_mean_norm": jnp.sqrt(jnp.mean(p["mean"] ** 2))}
    return state.replace(step=state.step + 1, extra={"replay": replay}), metrics


@register("find", family="diffusion_rl")
class FIND(pg.RewardObjective):
    """FIND on the frozen sampler named by `config.rl.sampler` (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        r = config.rl
        if r.baseline not in BASELINES:
            raise ConfigError(f"config.rl.baseline={r.baseline!r} is not known; allowed: {list(BASELINES)}")
        if r.replay < 1:
            raise ConfigError(f"config.rl.replay must be >= 1 (batches the clipped objective sees), got {r.replay}")
        if r.kl_weight < 0:
            raise ConfigError(f"config.rl.kl_weight must be >= 0, got {r.kl_weight}")
        self.sampler = pg.open_sampler(config, self.source)
        self.latent_shape, self.num_classes = self.sampler.latent_shape, self.sampler.num_classes
        self.num_rows = max(self.num_classes, 1)
        opt = lambda **kw: ts.Optimizer(ts.OptimizerSettings.from_config(config.train, **kw))
        self.optimizers = {"policy": opt(), "calib": opt(learning_rate=r.lr_calib, ema_decay=0.0)}
        self.name = f"FIND ({self.sampler.name})"

    def frozen(self):
        return {"sampler": self.sampler.frozen(), "reward": self.reward.frozen()}

    def init_state(self, key, frozen):
        params = init_params(self.num_rows, self.latent_shape)
        replay = init_replay(int(self.config.rl.replay), int(self.config.train.batch_size), self.latent_shape)
        return ts.create_state(params, self.optimizers, key, extra={"replay": replay})

    def train_step(self, state, frozen, batch):
        r = self.config.rl
        return find_step(state, frozen, batch, sample_fn=self.sampler, reward_fn=self.reward.value,
                         optimizers=self.optimizers, clip_eps=float(r.clip_eps), kl_weight=float(r.kl_weight),
                         baseline=r.baseline, advantage_norm=r.advantage_norm, num_rows=self.num_rows)

    def noise_batch(self, rng, b):
        return {"eps": rng.standard_normal((b,) + self.latent_shape).astype(np.float32)}

    def eval_fn(self, state, frozen):
        trained = state is not None
        if not hasattr(self, "_eval_fns"):
            def make(trained):
                def fn(args, noise, labels):
                    policy, sampler_params = args
                    z = noise
                    if trained:
                        z = policy["mean"][labels] + jnp.exp(policy["log_std"][labels]) * noise
                    return self.sampler(sampler_params, z, labels)
                return jax.jit(fn)
            self._eval_fns = {True: make(True), False: make(False)}
        policy = ts.eval_params(state, "policy", self.config.eval.use_ema) if trained else None
        return self._eval_fns[trained], (policy, frozen["sampler"])

    def evaluate(self, state, frozen, key):
        metrics = super().evaluate(state, frozen, key)
        p = jax.device_get(ts.eval_params(state, "policy", self.config.eval.use_ema))
        metrics["kl_to_prior"] = float(np.mean(kl_to_prior(jnp.asarray(p["mean"]), jnp.asarray(p["log_std"]))))
        metrics["policy_std"] = float(np.mean(np.exp(p["log_std"])))
        metrics["sampler_nfe"] = float(self.sampler.nfe)
        return metrics
