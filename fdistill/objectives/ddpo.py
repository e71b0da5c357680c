"""DDPO: the denoising network as a policy, fine-tuned by policy gradient through its stochastic
sampler (Black et al., arXiv 2305.13301; the importance-sampled, clipped variant DDPO_IS).

The policy is the stochastic ancestral sampler of the EDM denoiser D_theta on K Karras levels
s_0 = sigma_max > ... > s_{K-1} > s_K = 0 (`rl.ddpo_steps`; the VE form of DDIM with eta, Song et
al. arXiv 2010.02502, eq. 12): from x_i at s_i,

    x_{i+1} ~ N( D + sqrt(s_{i+1}^2 - v_i) (x_i - D) / s_i,  v_i I ),   D = D_theta(x_i; s_i),
    v_i = eta^2 s_{i+1}^2 (s_i^2 - s_{i+1}^2) / s_i^2,

(eta = 1: the DDPM posterior q(x_{i+1} | x_i, x_0 = D) of VE noising), and x_K = D_theta(x_{K-1};
s_{K-1}) (v = 0: the last step is deterministic and has no log-probability). x_0 = sigma_max z.

Each train step draws a batch of trajectories with the current network (the old policy, its
transition log-probabilities log p_old(x_{i+1} | x_i) kept), their final rewards, advantages
A = (r - mean r) / std r over the batch, or over each class's rows (DDPO's per-prompt statistics;
`rl.advantage_norm='class'`), then
makes `rl.inner_updates` Adam updates of the clipped surrogate summed over the K - 1 stochastic
transitions (averaged over them):

    L(theta) = -mean_{b, i} min( rho_{b,i} A_b, clip(rho_{b,i}, 1 - eps, 1 + eps) A_b ),
    rho_{b,i} = p_theta(x_{i+1} | x_i) / p_old(x_{i+1} | x_i).

The first update is the plain policy gradient (rho = 1); the later ones reuse the trajectories with
importance ratios. The policy starts from the score run named by `rl.sampler`, which also gives the
reference samples of the evaluation (the same sampler and noise with the untrained network).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import diffusion, runs
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.denoiser import label_kwargs
from fdistill.objectives import policy_gradient as pg
from fdistill.objectives.base import register


def ancestral_levels(num_steps: int, diffusion_config, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [K + 1] (s_K = 0), transition variances v [K]) of the sampler (module docstring)."""
    d = diffusion_config
    s = np.asarray(diffusion.karras_sigmas(num_steps, d.sigma_min, d.sigma_max, d.rho), np.float64)
    v = eta**2 * s[1:] ** 2 * (s[:-1] ** 2 - s[1:] ** 2) / s[:-1] ** 2
    return s.astype(np.float32), v.astype(np.float32)


def transition_mean(d: jax.Array, x: jax.Array, s: float, s_next: float, v: float) -> jax.Array:
    """The mean D + sqrt(s_next^2 - v) (x - D) / s of x_{i+1} given x_i = x and D = D(x; s)."""
    return d + (np.sqrt(max(s_next**2 - v, 0.0)) / s) * (x - d)


def transition_log_prob(x_next: jax.Array, mean: jax.Array, v: float) -> jax.Array:
    """log N(x_next; mean, v I), summed over the trailing axes of x_next [B, ...]."""
    axes = tuple(range(1, x_next.ndim))
    dim = np.prod(x_next.shape[1:])
    return -0.5 * jnp.sum((x_next - mean) ** 2, axis=axes) / v - 0.5 * dim * np.log(2 * np.pi * v)


class AncestralSampler:
    """The stochastic sampler as a policy: rollouts and the log-probabilities of their transitions."""

    def __init__(self, denoiser, num_steps: int, diffusion_config, eta: float, num_classes: int):
        if num_steps < 2:
            raise ConfigError(f"config.rl.ddpo_steps must be >= 2 (the last step is deterministic), got {num_steps}")
        if not eta > 0:
            raise ConfigError(f"config.rl.ddpo_eta must be > 0 (eta = 0 is a deterministic sampler: no policy), got {eta}")
        self.denoiser, self.num_classes = denoiser, num_classes
        self.sigmas, self.variances = ancestral_levels(num_steps, diffusion_config, eta)
        self.num_steps = int(num_steps)

    def _denoise(self, params, x, i, labels):
        s = jnp.full(x.shape[:1], self.sigmas[i])
        return self.denoiser(params, x, s, **label_kwargs(self.num_classes, labels))

    def _mean(self, params, x, i: int, labels):
        """The mean of x_{i+1} given x_i = x under the network at `params`."""
        return transition_mean(self._denoise(params, x, i, labels), x, float(self.sigmas[i]),
                               float(self.sigmas[i + 1]), float(self.variances[i]))

    def rollout(self, params, z, noise, labels):
        """(states [K, B, ...] = x_0 .. x_{K-1}, final sample x_K) from x_0 = sigma_max z with the
        transition noise `noise` [B, K - 1, ...]."""
        x = self.sigmas[0] * z
        xs = [x]
        for i in range(self.num_steps - 1):
            x = self._mean(params, x, i, labels) + np.sqrt(self.variances[i]) * noise[:, i]
            xs.append(x)
        return jnp.stack(xs), self._denoise(params, x, self.num_steps - 1, labels)

    def log_probs(self, params, states, labels):
        """log p_theta(x_{i+1} | x_i) for i = 0 .. K - 2: [K - 1, B]."""
        return jnp.stack([transition_log_prob(states[i + 1], self._mean(params, states[i], i, labels),
                                              float(self.variances[i])) for i in range(self.num_steps - 1)])

    def sample(self, params, z, noise, labels):
        return self.rollout(params, z, noise, labels)[1]


def ddpo_step(state, frozen, batch, *, policy: AncestralSampler, reward_fn, optimizer, clip_eps: float,
              inner_updates: int, advantage_norm: str, num_rows: int):
    """One DDPO_IS round (module docstring) on `batch` = {'z', 'noise', 'labels'}: pure, jittable."""
    z, noise, labels = batch["z"], batch["noise"], batch["labels"]
    old = jax.lax.stop_gradient(state.params)
    states, x = policy.rollout(old, z, noise, labels)
    states = jax.lax.stop_gradient(states)
    reward = reward_fn(frozen["reward"], jax.lax.stop_gradient(x))
    logp_old = jax.lax.stop_gradient(policy.log_probs(old, states, labels))
    centred = reward - pg.group_mean(reward, labels, num_rows if advantage_norm == "class" else 1)
    adv = jax.lax.stop_gradient(pg.normalize_advantages(centred, labels, num_rows, advantage_norm))

    def loss_fn(params):
        logp = policy.log_probs(params, states, labels)
        per, rho, clipped = pg.clipped_surrogate(logp, logp_old, adv[None, :], clip_eps)
        return jnp.mean(per), {"clip_frac": jnp.mean(clipped), "ratio_max": jnp.max(rho)}

    def update(st, _):
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
        st, m_opt = ts.apply_gradients(st, grads, optimizer)
        return st, {"loss": loss, **m, **m_opt}

    state, ms = jax.lax.scan(update, state, None, length=inner_updates)
    metrics = {k: v[-1] for k, v in ms.items()}
    metrics["first_loss"] = ms["loss"][0]
    metrics["reward"] = jnp.mean(reward)
    return state.replace(step=state.step + 1), metrics


@register("ddpo", family="diffusion_rl")
class DDPO(pg.RewardObjective):
    """DDPO_IS fine-tuning of the score run named by `config.rl.sampler` (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        r = config.rl
        if r.inner_updates < 1:
            raise ConfigError(f"config.rl.inner_updates must be >= 1, got {r.inner_updates}")
        sampler = pg.open_sampler(config, self.source)
        if not isinstance(sampler, pg.ODESampler):
            raise ConfigError(f"config.rl.sampler={r.sampler!r} holds a {sampler.config.objective!r} run; DDPO fine-tunes "
                             f"a diffusion network: name a {' or '.join(runs.DIFFUSION_RUNS)} run")
        self.ref_params = sampler.params
        self.latent_shape, self.num_classes = sampler.latent_shape, sampler.num_classes
        self.num_rows = max(self.num_classes, 1)
        self.policy = AncestralSampler(sampler.denoiser, int(r.ddpo_steps), config.diffusion, float(r.ddpo_eta),
                                       self.num_classes)
        # rl.inner_updates Adam updates per round: the schedule counts rounds (train.num_steps)
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train,
                                                                       updates_per_step=int(r.inner_updates)))
        self.name = f"DDPO ({self.policy.num_steps}-step ancestral, eta {r.ddpo_eta:g})"

    def frozen(self):
        return {"ref": self.ref_params, "reward": self.reward.frozen()}

    def init_state(self, key, frozen):
        return ts.create_state(jax.tree.map(jnp.array, frozen["ref"]), self.optimizer, key)

    def train_step(self, state, frozen, batch):
        r = self.config.rl
        return ddpo_step(state, frozen, batch, policy=self.policy, reward_fn=self.reward.value,
                         optimizer=self.optimizer, clip_eps=float(r.clip_eps), inner_updates=int(r.inner_updates),
                         advantage_norm=r.advantage_norm, num_rows=self.num_rows)

    def noise_batch(self, rng, b):
        shape = self.latent_shape
        return {"z": rng.standard_normal((b,) + shape).astype(np.float32),
                "noise": rng.standard_normal((b, self.policy.num_steps - 1) + shape).astype(np.float32)}

    def eval_fn(self, state, frozen):
        """The trained policy's stochastic sampler (or the reference network's) with transition
        noise drawn from the initial noise's bits, so both see the same noise."""
        if not hasattr(self, "_eval_fn"):
            def fn(params, z, labels):
                key = jax.random.PRNGKey(0)
                key = jax.random.fold_in(key, jax.lax.bitcast_convert_type(z.reshape(-1)[0], jnp.uint32))
                noise = jax.random.normal(key, (z.shape[0], self.policy.num_steps - 1) + z.shape[1:])
                return self.policy.sample(params, z, noise, labels)
            self._eval_fn = jax.jit(fn)
        params = ts.eval_params(state, use_ema=self.config.eval.use_ema) if state is not None else frozen["ref"]
        return self._eval_fn, params
