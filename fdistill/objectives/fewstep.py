"""Few-step generators: DMD2 backward simulation (arXiv 2405.14867) and Trajectory Distribution
Matching (TDM, arXiv 2503.06674), built on the one-step f-distill objective (`distill.py`).

A K-step student (`distill.num_student_steps`) has a decreasing noise schedule
sigma_0 > ... > sigma_{K-1} (`distill.student_sigmas`; default `'karras'`: the first K points of the
EDM/Karras grid (arXiv 2206.00364 eq. 5) with K + 1 points from `distill.gen_sigma` down to
`diffusion.sigma_min`, i.e. the grid a K-step sampler would use, whose last point sigma_min is
dropped because denoising there is the identity; K = 1: [80], K = 2: [80, 2.53], K = 4:
[80, 17.6, 2.53, 0.171]). One sampling step is one network call x0_i = D_gen(x_i; sigma_i)
followed by re-noising to sigma_{i+1}; the sample is x0_{K-1}, so NFE = K. Sampling starts from
x_0 = sigma_0 z, and for K = 1 the student is exactly the one-step G(z) = D_gen(sigma_g z; sigma_g).

`'dmd2_multistep'` (DMD2 section 4.4, "backward simulation"; distillation notes section 2.2):
  * re-noising uses fresh noise, x_{i+1} = x0_i + sigma_{i+1} n_i, n_i ~ N(0, I), at training and at
    sampling time;
  * the training input of each example is produced by the current generator itself: a step
    k ~ U{0..K-1} per example, steps 0..k-1 run without gradient from pure noise, and the
    generator's one (differentiated) call at (x_k, sigma_k) is the sample x. No teacher sample and
    no real data enter the generator's inputs;
  * everything else is the `'distill'` objective unchanged: the f-divergence update
    h(r) (D_real - D_fake) of 2502.15681 Thm. 1 at a Karras noise level over the whole range, the
    fake score (EDM DSM) and the discriminator trained on those same backward-simulated samples, so
    every divergence of `fdistill.divergences` works. With K = 1 it *is* the `'distill'` step.
    The one fake score sees the mixture over k of the step outputs, so the objective is at rest when
    that mixture matches the data; single steps may share the modes out between them (measured on the
    mixture: `experiments/diagnostics/fewstep_step_modes.py`, README few-step section).

`'tdm'` (TDM; distillation notes section 4, read from `Luo-Yihong/TDM/train_tdm_demo.py`):
  * the student's own deterministic K-step trajectory: DDIM-like re-noising with the predicted
    noise, eps_i = (x_i - x0_i) / sigma_i, x_{i+1} = x0_i + sigma_{i+1} eps_i (VE form of DDIM);
  * per example a segment k ~ U{0..K-1}; the rollout (no gradient) gives x_k; the student predicts
    x0_theta = D_gen(x_k; sigma_k) (with gradient) and eps_theta; the segment end is
    x_mid = x0_theta + sigma_mid eps_theta with sigma_mid = sigma_{k+1} (sigma_K = 0);
  * sampling-steps-aware matching: the distillation level sigma is drawn uniformly on the Karras
    index grid *inside the segment*, sigma in [sigma_mid, sigma_k) (clamped to
    [grid[gen_index_min], grid[gen_index_max]]), and
    x_t = x_mid + sqrt(sigma^2 - sigma_mid^2) xi, xi ~ N(0, I)
        = x0_theta + sigma n~   with the "mixed noise" n~ = (sigma_mid eps_theta + sqrt(.) xi) / sigma;
  * generator: the same f-distill update as `'distill'` applied to x = x0_theta at x_t (for the
    reverse KL exactly TDM's mean((x0_theta - sg(x0_theta + D_real - D_fake))^2) / mean|x0_theta -
    D_real| up to the constant factor), gradient through x0_theta only;
  * fake score trained on those same trajectory points with TDM's weighting
        L_fake = mean_b[ min(SNR, c) w_IS mean_features (D_fake(x_t; sigma) - sg(x0_theta))^2 ],
    SNR = 1 / sigma^2 (VE), c = `distill.tdm_snr_clip` (TDM: 5), and the importance weight
        w_IS = exp(-mean_features(n~^2) / 2) / exp(-mean_features(xi^2) / 2)
    exactly as in the reference code (a per-feature-mean, i.e. tempered, Gaussian likelihood ratio
    that corrects for n~ not being Gaussian); `distill.tdm_importance_weight=False` drops it;
  * the discriminator (only when h(r) is non-trivial or lambda_gan > 0; TDM itself is data-free,
    `gmm_tdm.py` uses rkl without GAN) separates noised real data from these trajectory points.
  Simplifications against the reference: EDM VE noise instead of the DDPM schedule; the segment end
  is the next boundary (TDM's `--use_randmid`, a random sigma_mid inside the segment, is not
  implemented); no classifier-free guidance; no pseudo-Huber variant of the generator loss.

Evaluation is `'distill'`'s with the K-step sampler (`nfe` = K, `samples_per_sec` measured on it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import diffusion
from fdistill.objectives import distill as distill_lib
from fdistill.objectives.base import register

SIGMA_SCHEDULES = ("karras",)


def student_sigmas(num_steps: int, spec, sigma_max: float, sigma_min: float, rho: float) -> np.ndarray:
    """The K decreasing student noise levels: `spec='karras'` (the first K of K + 1 Karras points
    from sigma_max to sigma_min) or an explicit sequence / comma-separated string of K floats."""
    if isinstance(spec, str) and spec.strip() in SIGMA_SCHEDULES:
        s = np.array(diffusion.karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho)[:num_steps], np.float32)
        s[0] = sigma_max  # exact (float32 powers give 79.99998): K = 1 is then the one-step G(z)
        return s
    try:
        vals = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
        raise ValueError(f"config.distill.student_sigmas={spec!r} must be one of {list(SIGMA_SCHEDULES)} "
                         "or K comma-separated floats") from None
    s = np.asarray(vals, np.float32)
    if len(s) != num_steps or np.any(s <= 0) or np.any(np.diff(s) >= 0):
        raise ValueError(f"config.distill.student_sigmas={spec!r} must be {num_steps} (= num_student_steps) "
                         "strictly decreasing positive floats")
    return s


def select_step(xs: list, k: jax.Array) -> jax.Array:
    """xs[k_b][b] per example b (xs: list of K arrays [B, ...], k: [B] int)."""
    out = xs[0]
    for i in range(1, len(xs)):
        out = jnp.where(diffusion.expand(k == i, out), xs[i], out)
    return out


def importance_weight(mixed: jax.Array, xi: jax.Array) -> jax.Array:
    """TDM's w_IS = exp(-mean(n~^2)/2) / exp(-mean(xi^2)/2), means over the features ([B])."""
    axes = tuple(range(1, mixed.ndim))
    return jnp.exp(-0.5 * (jnp.mean(mixed**2, axis=axes) - jnp.mean(xi**2, axis=axes)))


class _FewStep(distill_lib.DistillObjective):
    """Shared K-step machinery: the schedule, the rollout, the K-step sampler, NFE = K."""

    stochastic: bool = True  # re-noise with fresh noise (DMD2) or with the predicted noise (TDM)

    def __init__(self, config):
        super().__init__(config)
        K = self.dc.get("num_student_steps", 1)
        if not isinstance(K, (int, np.integer)) or K < 1:
            raise ValueError(f"config.distill.num_student_steps must be an integer >= 1, got {K!r}")
        self.num_steps = int(K)
        self.sigmas = student_sigmas(self.num_steps, self.dc.get("student_sigmas", "karras"), self.gen_sigma,
                                     float(config.diffusion.sigma_min), float(config.diffusion.rho))
        self.eval_seed = int(self.dc.get("sampler_seed", 0))

    # ----- the K-step generator ----------------------------------------------------------------
    def renoise(self, x, x0, i: int, noise_i):
        """x_{i+1} from step i's prediction: fresh noise (DMD2) or the predicted one (DDIM, TDM)."""
        s_next = float(self.sigmas[i + 1])
        if self.stochastic:
            return x0 + s_next * noise_i
        return x0 + (s_next / float(self.sigmas[i])) * (x - x0)

    def trajectory(self, gen_params, z, labels=None, noise=None):
        """States x_0 = sigma_0 z, ..., x_{K-1} of the K-step sampler (no gradient)."""
        p = jax.lax.stop_gradient(gen_params)
        x = self.sigmas[0] * z
        xs = [x]
        for i in range(self.num_steps - 1):
            x0 = self.denoiser(p, x, jnp.full(z.shape[:1], self.sigmas[i]), **self._kw(labels))
            x = jax.lax.stop_gradient(self.renoise(x, x0, i, None if noise is None else noise[i]))
            xs.append(x)
        return xs

    def rollout_start(self, gen_params, z, labels, k: jax.Array, noise=None):
        """(x_k, sigma_k) per example: the current generator's rollout from x_0 = sigma_0 z stopped at
        its step k (no gradient; `noise` [K-1, B, ...] is the fresh re-noising noise or None)."""
        xs = self.trajectory(gen_params, z, labels, noise)
        return select_step(xs, k), jnp.asarray(self.sigmas)[k]

    def _eval_noise(self, z):
        """Fresh re-noising noise of the sampler, keyed by z's bits (every chunk of z differs)."""
        flat = z.reshape(-1)
        bits = jax.lax.bitcast_convert_type(flat[jnp.array([0, flat.shape[0] - 1])].astype(jnp.float32), jnp.uint32)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.eval_seed), bits[0]), bits[1])
        return jax.random.normal(key, (self.num_steps - 1,) + z.shape, z.dtype)

    def generate(self, gen_params, z, labels=None):
        """The K-step sampler (NFE = K): x_0 = sigma_0 z, then K denoiser calls with re-noising."""
        noise = self._eval_noise(z) if (self.stochastic and self.num_steps > 1) else None
        x_last = self.trajectory(gen_params, z, labels, noise)[-1]
        return self.denoiser(gen_params, x_last, jnp.full(z.shape[:1], self.sigmas[-1]), **self._kw(labels))

    def extra_draws(self, key, b: int) -> dict:
        """The randomness of one training input beyond z: the step k [B] and the re-noising noise."""
        k_k, k_n = jax.random.split(key)
        shape = (b,) + tuple(self.source.shape)
        noise = (jax.random.normal(k_n, (self.num_steps - 1,) + shape)
                 if self.stochastic and self.num_steps > 1 else None)
        return {"rollout": {"k": jax.random.randint(k_k, (b,), 0, self.num_steps), "noise": noise}}

    def train_sample(self, gen_params, draws):
        """The training sample D_gen(x_k; sigma_k), differentiated through this one call only; x_k is
        the generator's own rollout (`draws['rollout']`) or a precomputed `draws['start']`."""
        if "start" in draws:
            x_k, sigma_k = draws["start"]
        else:
            r = draws["rollout"]
            x_k, sigma_k = self.rollout_start(gen_params, draws["z"], draws["labels"], r["k"], r["noise"])
        return self.denoiser(gen_params, x_k, sigma_k, **self._kw(draws["labels"]))

    # ----- evaluation --------------------------------------------------------------------------
    def evaluate(self, state, frozen, key):
        m = super().evaluate(state, frozen, key)
        m["nfe"] = float(self.num_steps)
        m["num_student_steps"] = float(self.num_steps)
        return m

    def plot(self, state, frozen, plot_dir, step):
        import os

        x = getattr(self, "_last_samples", None)
        if x is None:
            x, _ = self.student_samples(state.params["gen"], jax.random.key(0), self.config.eval.num_samples)
        path = os.path.join(plot_dir, f"samples_{step:07d}.png")
        return [self.source.plot_samples(x, path, f"{self.num_steps}-step {self.name} ({self.div.name}), step {step}")]


@register("dmd2_multistep")
class BackwardSimulationObjective(_FewStep):
    """DMD2's K-step generator trained on its own backward-simulated inputs (module docstring)."""

    stochastic = True  # everything else is `_FewStep` plus the unchanged `distill` objective


@register("tdm")
class TrajectoryDistributionMatchingObjective(_FewStep):
    """TDM: sampling-steps-aware distribution matching along the student's deterministic trajectory."""

    stochastic = False

    def __init__(self, config):
        super().__init__(config)
        self.snr_clip = float(self.dc.get("tdm_snr_clip", 5.0))
        self.use_is = bool(self.dc.get("tdm_importance_weight", True))
        grid = np.asarray(self.grid)
        ext = np.concatenate([self.sigmas, [0.0]])
        # Karras-index range of each segment k: sigma in [sigma_{k+1}, sigma_k), within [index_lo, index_hi].
        lo = np.searchsorted(grid, ext[1:], side="left")
        hi = np.searchsorted(grid, ext[:-1], side="left") - 1
        lo = np.clip(lo, self.index_lo, self.index_hi)
        hi = np.clip(hi, lo, self.index_hi)
        self.segment_lo, self.segment_hi = lo.astype(np.int32), hi.astype(np.int32)
        self.sigmas_ext = ext.astype(np.float32)

    def draws(self, key, b):
        """The one-step draws (z, labels, eps = xi), the segment k, and a Karras index inside it."""
        d = super().draws(key, b)
        lo, hi = jnp.asarray(self.segment_lo)[d["rollout"]["k"]], jnp.asarray(self.segment_hi)[d["rollout"]["k"]]
        d["index"] = jax.random.randint(jax.random.fold_in(key, 0x7D3), (b,), lo, hi + 1)
        return d

    def trajectory_point(self, gen_params, draws) -> dict:
        """TDM's noisy trajectory point (all stop-gradient): x_k, x0_theta, x_t at sigma, n~, xi."""
        z, labels, k = draws["z"], draws["labels"], draws["rollout"]["k"]
        x_k, sigma_k = self.rollout_start(gen_params, z, labels, k)
        p = jax.lax.stop_gradient(gen_params)
        x0 = jax.lax.stop_gradient(self.denoiser(p, x_k, sigma_k, **self._kw(labels)))
        eps_theta = (x_k - x0) / diffusion.expand(sigma_k, x_k)
        sigma_mid = jnp.asarray(self.sigmas_ext)[k + 1]
        sigma = self.grid[draws["index"]]
        xi = draws["eps"]
        spread = jnp.sqrt(jnp.maximum(sigma**2 - sigma_mid**2, 0.0))
        x_t = x0 + diffusion.expand(sigma_mid, x0) * eps_theta + diffusion.expand(spread, x0) * xi
        mixed = (x_t - x0) / diffusion.expand(sigma, x0)
        return {"x_k": x_k, "sigma_k": sigma_k, "x0": x0, "x_t": x_t, "sigma": sigma, "mixed": mixed,
                "xi": xi, "sigma_mid": sigma_mid}

    def generator_loss(self, gen_params, critic, frozen, draws, bins):
        pt = self.trajectory_point(gen_params, draws)
        # The parent builds x_t = x + sigma eps with x = D_gen(x_k; sigma_k): eps = n~ puts it at
        # TDM's trajectory point, and the gradient flows through x0_theta only.
        d = {**draws, "eps": jax.lax.stop_gradient(pt["mixed"]), "start": (pt["x_k"], pt["sigma_k"])}
        return super().generator_loss(gen_params, critic, frozen, d, bins)

    def fake_loss(self, fake_params, pt, labels) -> tuple[jax.Array, jax.Array]:
        """TDM's fake-score loss (module docstring); returns (loss, w_IS [B])."""
        d_fake = self.denoiser(fake_params, pt["x_t"], pt["sigma"], **self._kw(labels))
        err = jnp.mean((d_fake - pt["x0"]) ** 2, axis=tuple(range(1, d_fake.ndim)))
        w_snr = jnp.minimum(1.0 / pt["sigma"] ** 2, self.snr_clip)
        w_is = importance_weight(pt["mixed"], pt["xi"]) if self.use_is else jnp.ones_like(err)
        w_is = jax.lax.stop_gradient(w_is)
        return jnp.mean(w_snr * w_is * err), w_is

    def critic_loss(self, critic, gen_params, x_real, labels_real, key):
        """Fake score on the student's trajectory points (+ the discriminator when it is needed)."""
        b = x_real.shape[0]
        k_d, k_ir, k_er = jax.random.split(key, 3)
        draws = self.draws(k_d, b)
        pt = self.trajectory_point(gen_params, draws)
        l_fake, w_is = self.fake_loss(critic["fake"], pt, draws["labels"])
        aux = {"loss_fake": l_fake, "tdm/w_is_mean": jnp.mean(w_is), "tdm/w_is_max": jnp.max(w_is)}
        if not self.use_disc:
            return l_fake, aux
        s_r = self.grid[self._sigma_index(k_ir, b)]
        xt_r = x_real + diffusion.expand(s_r, x_real) * jax.random.normal(k_er, x_real.shape)
        logit_f, _ = self.disc_logits(critic, pt["x_t"], pt["sigma"], draws["labels"])
        logit_r, _ = self.disc_logits(critic, xt_r, s_r, labels_real)
        l_disc = distill_lib.disc_loss(logit_r, logit_f)
        aux.update({"loss_disc": l_disc, "disc/logit_real": jnp.mean(logit_r),
                    "disc/logit_fake": jnp.mean(logit_f),
                    "disc/accuracy": 0.5 * (jnp.mean(logit_r > 0) + jnp.mean(logit_f < 0))})
        return l_fake + float(self.dc.get("disc_loss_weight", 1.0)) * l_disc, aux
