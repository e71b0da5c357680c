"""f-distill: one-step generators by f-divergence distribution matching (arXiv 2502.15681).

The student G(z) = D_gen(sigma_g z; sigma_g) is trained so that its noised marginals q_t match the
teacher's p_t under an f-divergence. The generator gradient (2502.15681, Thm. 1; distillation notes
section 1.1) is the teacher/student score difference weighted by h(r) = f''(r) r^2 of the density
ratio r = p_t / q_t:

    grad_theta D_f = - E[ h(r(x_t)) (grad log p_t(x_t) - grad log q_t(x_t))^T dx_t/dtheta ],
    grad log p_t - grad log q_t = (D_real(x_t; sigma) - D_fake(x_t; sigma)) / sigma^2      (EDM).

Three networks: the generator, a fake score D_fake trained by denoising score matching on
stop-gradient generator samples (DMD2, arXiv 2405.14867), and a discriminator whose logit estimates
log r (density-ratio trick), either a head on the fake score's hidden features (DMD2's classifier
branch) or a separate network. One `train_step` does K = `distill.fake_updates_per_gen` critic
updates (fake score + discriminator) followed by one generator update (two time-scale rule);
`state.step` counts generator updates. Per generator update (FastGen `f_distill.py` conventions):

    r   = clip(exp(clip(logit, -c, c)), r_min, r_max)           (stop-gradient)
    r  <- r / mean(r in its noise-level bin)                     (normalisation stage 1)
    h   = h(r) / mean_batch h(r)                                 (normalisation stage 2)
    w   = 1 / mean_features |x - D_real|                         (DMD per-sample weight)
    g   = stopgrad((D_fake - D_real) w h)
    L_G = 0.5 mean((x - stopgrad(x - g))^2) + lambda_gan softplus(-logit(x_t))
    L_fake = EDM-weighted DSM of D_fake on stopgrad(G(z));  L_D = softplus(-logit(real_t)) + softplus(logit(fake_t))

With the reverse KL (h = 1) and lambda_gan = 0 this is exactly the DMD / VSD update; DMD2 adds the
GAN term. The teacher is the exact GMM denoiser (`distill.teacher='analytic'`) or the EMA
parameters of a finished `score` run (`distill.teacher=<workdir>`), which also initialise the
generator and the fake score. The module is agnostic to the data source and the network: anything
`fdistill.data.build` and `fdistill.models.build` provide works (the networks must accept
`features=True` for a discriminator head).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdistill import data as data_lib
from fdistill import diffusion, divergences
from fdistill.evaluation import ratio as ratio_lib
from fdistill.evaluation.samples import MIN_EVAL_SAMPLES
from fdistill.objectives import score as score_lib
from fdistill.objectives.base import Objective, register

DISC_ON = ("fake_score", "separate")
CRITIC_LOOPS = ("scan", "unroll")
FAKE_SIGMAS = ("karras", "lognormal")
EXTRA_DRAWS_SALT = 0x5EED  # fold_in salt of `extra_draws`' key (keeps the one-step draws unchanged)


@flax.struct.dataclass
class DistillState:
    """`params`/`opt_state` are dicts with keys 'gen', 'fake', 'disc'; `ratio_bins` holds the
    per-noise-bin mean ratio used by normalisation stage 1 (an EMA when `distill.ratio_ema` > 0)."""

    step: jax.Array
    rng: jax.Array
    params: Any
    opt_state: Any
    ratio_bins: jax.Array


class DiscriminatorHead(nn.Module):
    """Logit of "real" from hidden features: flattens [B, ...] features (MLP [B, c] or a U-Net
    bottleneck [B, h, w, c]), then an MLP to one logit per example."""

    hidden: int = 128
    depth: int = 2

    @nn.compact
    def __call__(self, feats: jax.Array) -> jax.Array:
        h = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(1)(h)[:, 0]


class AnalyticTeacher:
    """The exact GMM denoiser in the `Denoiser` calling convention: `d(gmm, x, sigma)`."""

    def __init__(self, sigma_data: float):
        self.sigma_data = float(sigma_data)

    def __call__(self, gmm, x: jax.Array, sigma: jax.Array, **kw) -> jax.Array:
        return gmm.denoise(x, sigma)


# ----- pure pieces of the generator loss (tested on their own) ------------------------------------


def ratio_from_logits(logits: jax.Array, logit_clip: float, r_min: float, r_max: float) -> jax.Array:
    """r = clip(exp(clip(logit, -c, c)), r_min, r_max): the density-ratio trick, exp(logit) = p/q at
    the optimum of the logistic loss (FastGen `_get_f_div_weighting_h`)."""
    return jnp.clip(jnp.exp(jnp.clip(logits, -logit_clip, logit_clip)), r_min, r_max)


def bin_normalize(r: jax.Array, bin_idx: jax.Array, bins: jax.Array, ema: float = 0.0):
    """Normalisation stage 1: r / (mean of r in its noise-level bin), the bin means being an EMA
    (rate `ema`; 0 = this batch only) updated where the batch has samples. Returns (r_n, bins)."""
    num_bins = bins.shape[0]
    onehot = jax.nn.one_hot(bin_idx, num_bins, dtype=r.dtype)  # [B, nb]
    count = onehot.sum(0)
    mean = (onehot * r[:, None]).sum(0) / jnp.maximum(count, 1.0)
    bins = jnp.where(count > 0, ema * bins + (1.0 - ema) * mean, bins)
    return r / (bins[bin_idx] + 1e-6), bins


def normalized_h(div: divergences.Divergence, r: jax.Array) -> jax.Array:
    """Normalisation stage 2: h(r) / mean_batch h(r) (exactly 1 for the reverse KL)."""
    h = jnp.broadcast_to(div.h(r), r.shape).astype(jnp.float32)
    return h / jnp.maximum(jnp.mean(h), 1e-12)


def teacher_error_weight(x: jax.Array, d_real: jax.Array) -> jax.Array:
    """DMD per-sample weight w = 1 / mean_features |x - D_real(x_t)| (arXiv 2311.18828, eq. 8)."""
    err = jnp.mean(jnp.abs(x - d_real), axis=tuple(range(1, x.ndim)))
    return 1.0 / (err + 1e-6)


def dm_loss(x: jax.Array, d_real: jax.Array, d_fake: jax.Array, h: jax.Array, w: jax.Array) -> jax.Array:
    """0.5 mean((x - sg(x - g))^2), g = sg((D_fake - D_real) w h): its gradient in x is g / x.size,
    i.e. descent moves x along h (D_real - D_fake) = h sigma^2 (grad log p_t - grad log q_t)."""
    g = jax.lax.stop_gradient((d_fake - d_real) * diffusion.expand(w * h, x))
    return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - g)) ** 2)


def disc_loss(logit_real: jax.Array, logit_fake: jax.Array) -> jax.Array:
    """Logistic (non-saturating GAN) discriminator loss softplus(-l_real) + softplus(l_fake)."""
    return jnp.mean(jax.nn.softplus(-logit_real)) + jnp.mean(jax.nn.softplus(logit_fake))


def gan_generator_loss(logit_fake: jax.Array) -> jax.Array:
    """Non-saturating generator GAN loss softplus(-logit(G(z)_t))."""
    return jnp.mean(jax.nn.softplus(-logit_fake))


# ----- the objective -------------------------------------------------------------------------------

_TEACHER_METRICS: dict = {}  # computed once per process (the teacher is frozen)


def check_same_data(data, teacher_data, teacher_dir: str) -> None:
    """The student's `config.data` must describe the teacher's distribution: every field equal
    except `data_dir` (a path) and, for stored datasets, `seed` (only the shuffling order; for the
    mixture the seed places the modes)."""
    skip = {"data_dir"} | ({"seed"} if data.name != "gmm" else set())
    ours, theirs = data.to_dict(), teacher_data.to_dict()
    diff = [k for k in sorted(set(ours) & set(theirs)) if k not in skip and ours[k] != theirs[k]]
    if diff:
        detail = ", ".join(f"config.data.{k}={ours[k]!r} (teacher: {theirs[k]!r})" for k in diff)
        raise ValueError(f"the student's data differs from the teacher's in config.distill.teacher={teacher_dir!r}: "
                         f"{detail}")


def _choice(value, allowed, field):
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {list(allowed)}")
    return value


@register("distill")
class DistillObjective(Objective):
    """f-distill / DMD2 / VSD on any diffusion data source (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        dc = config.distill
        self.dc = dc
        if dc.teacher == "analytic" and config.data.name != "gmm":
            raise ValueError(
                f"config.distill.teacher='analytic' needs config.data.name='gmm' (got {config.data.name!r}); "
                "for other data pass the workdir of a finished 'score' run"
            )
        self.source = data_lib.build(config.data)
        self.div = divergences.from_config(dc)
        self.K = int(dc.fake_updates_per_gen)
        if self.K < 1:
            raise ValueError(f"config.distill.fake_updates_per_gen must be >= 1, got {self.K}")
        self.disc_on = _choice(dc.disc_on, DISC_ON, "config.distill.disc_on")
        self.critic_loop = _choice(dc.get("critic_loop", "scan"), CRITIC_LOOPS, "config.distill.critic_loop")
        self.fake_sigma = _choice(dc.get("fake_sigma", "karras"), FAKE_SIGMAS, "config.distill.fake_sigma")
        self.lambda_gan = float(dc.lambda_gan)
        if self.lambda_gan < 0:
            raise ValueError(f"config.distill.lambda_gan must be >= 0, got {self.lambda_gan}")
        # The discriminator is needed for a non-trivial h(r) or for the GAN term; VSD/DMD need neither.
        self.use_disc = self.div.name != "rkl" or self.lambda_gan > 0
        if config.eval.num_samples < MIN_EVAL_SAMPLES:
            raise ValueError(f"config.eval.num_samples must be >= {MIN_EVAL_SAMPLES}, got {config.eval.num_samples}")

        # Teacher, and the architecture shared by generator and fake score.
        teacher = dc.teacher
        if teacher == "analytic":
            self.teacher_params = None
            self.teacher = AnalyticTeacher(config.diffusion.sigma_data)
            self.net_config = config
            self.denoiser = score_lib.build_denoiser(config, self.source.shape)
        else:
            if not isinstance(teacher, str) or not os.path.isdir(teacher):
                raise ValueError(
                    f"config.distill.teacher={teacher!r} must be 'analytic' or the workdir of a finished 'score' run"
                )
            self.teacher, self.teacher_params, tconfig = score_lib.load_teacher(teacher)
            check_same_data(config.data, tconfig.data, teacher)
            self.net_config = tconfig  # generator and fake score copy the teacher's architecture
            self.denoiser = self.teacher
        self.sigma_data = self.denoiser.sigma_data
        self.conditional = bool(self.source.num_classes and self.net_config.model.get("num_classes", 0))
        if self.disc_on == "separate":
            self.disc_net = score_lib.build_denoiser(self.net_config, self.source.shape)
        self.head = DiscriminatorHead(int(dc.get("disc_hidden", 128)), int(dc.get("disc_depth", 2)))

        # Noise levels: an ascending Karras grid (index 0 = sigma_min), as in DMD2.
        d = config.diffusion
        n = int(dc.get("num_sigmas", 1000))
        self.grid = jnp.flip(diffusion.karras_sigmas(n, d.sigma_min, d.sigma_max, d.rho)[:n])
        self.index_lo, self.index_hi = int(dc.gen_index_min), int(dc.gen_index_max)
        if not 0 <= self.index_lo <= self.index_hi < n:
            raise ValueError(
                f"config.distill.gen_index_min/max=({self.index_lo}, {self.index_hi}) must satisfy "
                f"0 <= min <= max < num_sigmas={n}"
            )
        self.num_bins = int(dc.get("ratio_bins", 10))
        self.gen_sigma = float(dc.get("gen_sigma", d.sigma_max))

        def optimizer(lr_field):
            tc = ml_collections.ConfigDict(config.train.to_dict())
            lr = dc.get(lr_field, None)
            tc.learning_rate = float(lr) if lr is not None else float(config.train.learning_rate)
            return score_lib.make_optimizer(tc)

        self.tx = {"gen": optimizer("lr_gen"), "fake": optimizer("lr_fake"), "disc": optimizer("lr_disc")}
        self._jit_cache: dict = {}

    # ----- networks --------------------------------------------------------------------------
    def _kw(self, labels) -> dict:
        return {"labels": labels} if self.conditional else {}

    def generate(self, gen_params, z: jax.Array, labels=None) -> jax.Array:
        """One-step sample G(z) = D_gen(sigma_g z; sigma_g)."""
        s = self.gen_sigma
        return self.denoiser(gen_params, s * z, jnp.full(z.shape[:1], s), **self._kw(labels))

    def disc_logits(self, critic, x_t, sigma, labels=None, with_fake: bool = False):
        """(logit of "real" at (x_t, sigma), D_fake(x_t; sigma) when `with_fake` else None)."""
        kw = self._kw(labels)
        d_fake = None
        if self.disc_on == "fake_score":
            d_fake, feats = self.denoiser.with_features(critic["fake"], x_t, sigma, **kw)
        else:
            _, feats = self.disc_net.with_features(critic["disc"]["trunk"], x_t, sigma, **kw)
            if with_fake:
                d_fake = self.denoiser(critic["fake"], x_t, sigma, **kw)
        logits = self.head.apply({"params": critic["disc"]["head"]}, feats)
        return logits, d_fake

    def teacher_denoise(self, frozen, x_t, sigma, labels=None):
        return self.teacher(frozen["teacher"], x_t, sigma, **self._kw(labels))

    # ----- contract --------------------------------------------------------------------------
    def init(self, key):
        k_gen, k_fake, k_trunk, k_head, k_rng = jax.random.split(key, 5)
        x = jnp.zeros((1,) + tuple(self.source.shape), jnp.float32)
        kw = self._kw(jnp.zeros((1,), jnp.int32))
        if self.teacher_params is None:
            gen = self.denoiser.init(k_gen, x, **kw)
            fake = self.denoiser.init(k_fake, x, **kw)
            frozen = {"teacher": self.source.gmm}
        else:  # DMD2: generator and fake score start from the teacher
            gen = jax.tree.map(jnp.array, self.teacher_params)
            fake = jax.tree.map(jnp.array, self.teacher_params)
            frozen = {"teacher": self.teacher_params}
        disc = {}
        trunk = fake
        if self.disc_on == "separate":
            disc["trunk"] = trunk = self.disc_net.init(k_trunk, x, **kw)
        net = self.denoiser if self.disc_on == "fake_score" else self.disc_net
        feats = jax.eval_shape(lambda p: net.with_features(p, x, jnp.ones((1,)), **kw)[1], trunk)
        disc["head"] = self.head.init(k_head, jnp.zeros(feats.shape, jnp.float32))["params"]
        params = {"gen": gen, "fake": fake, "disc": disc}
        state = DistillState(
            step=jnp.zeros((), jnp.int32),
            rng=k_rng,
            params=params,
            opt_state={k: self.tx[k].init(params[k]) for k in ("gen", "fake", "disc")},
            ratio_bins=jnp.ones((max(self.num_bins, 1),), jnp.float32),
        )
        return state, frozen

    def batch(self, step, process_index=0, process_count=1):
        """K real batches per generator update, stacked on axis 1: {'x': [B, K, ...]}."""
        parts = [
            self.source.batch(step * self.K + k, self.config.train.batch_size, process_index, process_count)
            for k in range(self.K)
        ]
        out = {"x": np.stack([p["x"] for p in parts], axis=1)}
        if "label" in parts[0]:
            out["label"] = np.stack([p["label"] for p in parts], axis=1)
        return out

    # ----- losses ----------------------------------------------------------------------------
    def _labels(self, key, n):
        return jax.random.randint(key, (n,), 0, max(int(self.source.num_classes), 1))

    def _sigma_index(self, key, n):
        return jax.random.randint(key, (n,), self.index_lo, self.index_hi + 1)

    def critic_loss(self, critic, gen_params, x_real, labels_real, key):
        """L_fake (EDM-weighted DSM on sg(G(z))) + disc_loss_weight * L_D; returns (loss, aux)."""
        b = x_real.shape[0]
        k_z, k_lab, k_sf, k_nf, k_if, k_ir, k_ef, k_er = jax.random.split(key, 8)
        labels_gen = self._labels(k_lab, b)
        gen_draws = {"z": jax.random.normal(k_z, x_real.shape), "labels": labels_gen,
                     **self.extra_draws(jax.random.fold_in(key, EXTRA_DRAWS_SALT), b)}
        x_fake = jax.lax.stop_gradient(self.train_sample(gen_params, gen_draws))
        if self.fake_sigma == "karras":
            sigma_f = self.grid[jax.random.randint(k_sf, (b,), 0, self.grid.shape[0])]
        else:
            d = self.config.diffusion
            sigma_f = diffusion.sample_lognormal_sigma(k_sf, (b,), d.p_mean, d.p_std)
        noise = jax.random.normal(k_nf, x_fake.shape)
        if not self.use_disc:
            l_fake = jnp.mean(score_lib.edm_dsm_loss(self.denoiser, critic["fake"], x_fake, sigma_f, noise,
                                                     **self._kw(labels_gen)))
            return l_fake, {"loss_fake": l_fake}
        s_f, s_r = self.grid[self._sigma_index(k_if, b)], self.grid[self._sigma_index(k_ir, b)]
        xt_f = x_fake + diffusion.expand(s_f, x_fake) * jax.random.normal(k_ef, x_fake.shape)
        xt_r = x_real + diffusion.expand(s_r, x_real) * jax.random.normal(k_er, x_real.shape)
        if self.disc_on == "fake_score":
            # One pass of the fake-score network over [DSM inputs; noised fake; noised real]: the
            # same losses as three separate calls, with fewer (larger) matmuls.
            x_all = jnp.concatenate([x_fake + diffusion.expand(sigma_f, x_fake) * noise, xt_f, xt_r])
            s_all = jnp.concatenate([sigma_f, s_f, s_r])
            lab_all = jnp.concatenate([labels_gen, labels_gen, labels_real])
            d_all, feats = self.denoiser.with_features(critic["fake"], x_all, s_all, **self._kw(lab_all))
            err = jnp.mean((d_all[:b] - x_fake) ** 2, axis=tuple(range(1, x_fake.ndim)))
            l_fake = jnp.mean(diffusion.loss_weight(sigma_f, self.sigma_data) * err)  # EDM eq. 8
            logits = self.head.apply({"params": critic["disc"]["head"]}, feats[b:])
            logit_f, logit_r = logits[:b], logits[b:]
        else:
            l_fake = jnp.mean(score_lib.edm_dsm_loss(self.denoiser, critic["fake"], x_fake, sigma_f, noise,
                                                     **self._kw(labels_gen)))
            logit_f, _ = self.disc_logits(critic, xt_f, s_f, labels_gen)
            logit_r, _ = self.disc_logits(critic, xt_r, s_r, labels_real)
        aux = {"loss_fake": l_fake}
        l_disc = disc_loss(logit_r, logit_f)
        aux.update({
            "loss_disc": l_disc,
            "disc/logit_real": jnp.mean(logit_r),
            "disc/logit_fake": jnp.mean(logit_f),
            "disc/accuracy": 0.5 * (jnp.mean(logit_r > 0) + jnp.mean(logit_f < 0)),
        })
        return l_fake + float(self.dc.get("disc_loss_weight", 1.0)) * l_disc, aux

    def draws(self, key, b: int) -> dict:
        """The randomness of one generator update (exposed so tests can replay it): z, labels, the
        noise-level index and eps of x_t, plus `extra_draws`."""
        k_z, k_lab, k_i, k_e = jax.random.split(key, 4)
        shape = (b,) + tuple(self.source.shape)
        return {
            "z": jax.random.normal(k_z, shape),
            "labels": self._labels(k_lab, b),
            "index": self._sigma_index(k_i, b),
            "eps": jax.random.normal(k_e, shape),
            **self.extra_draws(jax.random.fold_in(key, EXTRA_DRAWS_SALT), b),
        }

    def extra_draws(self, key, b: int) -> dict:
        """Randomness of a training sample beyond z and labels (none for the one-step generator;
        few-step objectives add their rollout's)."""
        return {}

    def train_sample(self, gen_params, draws: dict) -> jax.Array:
        """The generator sample that a training update uses and differentiates: here G(z). The one
        hook a few-step objective overrides (its sample is one call on a rolled-out input)."""
        return self.generate(gen_params, draws["z"], draws["labels"])

    def generator_loss(self, gen_params, critic, frozen, draws, bins):
        """f-distill generator loss (module docstring); returns (loss, (aux, new_bins, pieces))."""
        labels = draws["labels"]
        x = self.train_sample(gen_params, draws)
        sigma = self.grid[draws["index"]]
        x_t = x + diffusion.expand(sigma, x) * draws["eps"]
        d_real = jax.lax.stop_gradient(self.teacher_denoise(frozen, x_t, sigma, labels))
        aux = {}
        if self.use_disc:
            logits, d_fake = self.disc_logits(critic, x_t, sigma, labels, with_fake=True)
            r = ratio_from_logits(jax.lax.stop_gradient(logits), float(self.dc.get("logit_clip", 10.0)),
                                  float(self.dc.get("ratio_min", 0.1)), float(self.dc.get("ratio_max", 20.0)))
            if self.num_bins > 0:
                span = self.index_hi - self.index_lo + 1
                bin_idx = jnp.minimum((draws["index"] - self.index_lo) * self.num_bins // span, self.num_bins - 1)
                r_n, bins = bin_normalize(r, bin_idx, bins, float(self.dc.get("ratio_ema", 0.0)))
            else:
                r_n = r
            h = normalized_h(self.div, r_n)
            l_gan = gan_generator_loss(logits)
            aux.update({"r/mean": jnp.mean(r), "r/min": jnp.min(r), "r/max": jnp.max(r)})
        else:
            d_fake = self.denoiser(critic["fake"], x_t, sigma, **self._kw(labels))
            h = jnp.ones(x.shape[:1], jnp.float32)
            l_gan = jnp.zeros((), jnp.float32)
        d_fake = jax.lax.stop_gradient(d_fake)
        if self.dc.get("teacher_error_norm", True):
            w = jax.lax.stop_gradient(teacher_error_weight(x, d_real))
        else:
            w = jnp.ones(x.shape[:1], jnp.float32)
        l_dm = dm_loss(x, d_real, d_fake, h, w)
        loss = l_dm + self.lambda_gan * l_gan
        aux.update({"loss_dm": l_dm, "loss_gan": l_gan, "h/min": jnp.min(h), "h/mean": jnp.mean(h),
                    "h/max": jnp.max(h)})
        return loss, (aux, bins, {"x": x, "x_t": x_t, "d_real": d_real, "d_fake": d_fake, "h": h, "w": w})

    # ----- the step --------------------------------------------------------------------------
    def _critic_update(self, critic, copt, gen_params, x_real, labels_real, key):
        (_, aux), grads = jax.value_and_grad(self.critic_loss, has_aux=True)(
            critic, gen_params, x_real, labels_real, key)
        new_critic, new_opt = {}, {}
        for name in ("fake", "disc"):
            updates, new_opt[name] = self.tx[name].update(grads[name], copt[name], critic[name])
            new_critic[name] = optax.apply_updates(critic[name], updates)
        aux["grad_norm/fake"] = optax.global_norm(grads["fake"])
        return new_critic, new_opt, aux

    def train_step(self, state, frozen, batch):
        key = jax.random.fold_in(state.rng, state.step)
        k_critic, k_gen = jax.random.split(key)
        x_real = jnp.moveaxis(batch["x"], 1, 0)  # [K, B, ...]
        b = x_real.shape[1]
        labels_real = (jnp.moveaxis(batch["label"], 1, 0) if "label" in batch
                       else jnp.zeros((self.K, b), jnp.int32))
        p, o = state.params, state.opt_state
        critic = {"fake": p["fake"], "disc": p["disc"]}
        copt = {"fake": o["fake"], "disc": o["disc"]}
        keys = jax.random.split(k_critic, self.K)

        if self.critic_loop == "scan":
            def body(carry, inp):
                c, co = carry
                c, co, aux = self._critic_update(c, co, p["gen"], *inp)
                return (c, co), aux

            (critic, copt), auxs = jax.lax.scan(body, (critic, copt), (x_real, labels_real, keys))
        else:  # Python-unrolled (conv gradients inside scan are slow on CPU)
            aux_list = []
            for k in range(self.K):
                critic, copt, aux = self._critic_update(critic, copt, p["gen"], x_real[k], labels_real[k], keys[k])
                aux_list.append(aux)
            auxs = jax.tree.map(lambda *a: jnp.stack(a), *aux_list)
        critic_metrics = {k: jnp.mean(v) for k, v in auxs.items()}

        draws = self.draws(k_gen, b)
        (loss, (aux, bins, _)), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
            p["gen"], critic, frozen, draws, state.ratio_bins)
        updates, gen_opt = self.tx["gen"].update(grads, o["gen"], p["gen"])
        gen = optax.apply_updates(p["gen"], updates)
        metrics = {"loss": loss, "loss_gen": loss, **aux, **critic_metrics,
                   "grad_norm/gen": optax.global_norm(grads)}
        new_state = state.replace(
            step=state.step + 1,
            params={"gen": gen, "fake": critic["fake"], "disc": critic["disc"]},
            opt_state={"gen": gen_opt, "fake": copt["fake"], "disc": copt["disc"]},
            ratio_bins=bins,
        )
        return new_state, metrics

    # ----- evaluation ------------------------------------------------------------------------
    def _jit(self, name, fn):
        if name not in self._jit_cache:
            self._jit_cache[name] = jax.jit(fn)
        return self._jit_cache[name]

    def student_samples(self, gen_params, key, n: int, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
        """n one-step samples, generated in jitted chunks of `config.eval.chunk`."""
        chunk = int(self.config.eval.get("chunk", 4096))
        fn = self._jit("generate", self.generate)
        out, labs = [], []
        for i, start in enumerate(range(0, n, chunk)):
            k_z, k_l = jax.random.split(jax.random.fold_in(key, i))
            z = jax.random.normal(k_z, (chunk,) + tuple(self.source.shape))
            lab = self._labels(k_l, chunk) if labels is None else jnp.asarray(
                np.resize(np.asarray(labels)[start:start + chunk], chunk))
            out.append(np.asarray(fn(gen_params, z, lab)))
            labs.append(np.asarray(lab))
        return np.concatenate(out)[:n], (np.concatenate(labs)[:n] if self.conditional else None)

    def _teacher_metrics(self, frozen, key, labels) -> dict[str, float]:
        e = self.config.eval
        cache_key = json.dumps([str(self.dc.teacher), self.config.data.to_dict(), e.num_samples,
                                e.get("num_steps", 18), e.get("sampler", "heun")], sort_keys=True, default=str)
        if cache_key in _TEACHER_METRICS:
            return _TEACHER_METRICS[cache_key]
        num_steps, sampler = int(e.get("num_steps", 18)), e.get("sampler", "heun")

        def run(n):
            return score_lib.generate(self.teacher, frozen["teacher"], self.source.shape, key, n, num_steps,
                                      sampler, self.config.diffusion, int(e.get("chunk", 4096)),
                                      self.source.num_classes if self.conditional else 0, labels)

        run(min(e.num_samples, 256))  # compile outside the timed region
        t0 = time.perf_counter()
        x = run(e.num_samples)
        elapsed = time.perf_counter() - t0
        m = {f"teacher/{k}": float(v) for k, v in self.source.evaluate_samples(x, labels).items()}
        m["teacher/nfe"] = float(diffusion.nfe(num_steps, sampler))
        m["teacher/samples_per_sec"] = e.num_samples / elapsed
        _TEACHER_METRICS[cache_key] = m
        return m

    def ratio_spearman(self, params, key, n_batch: int = 4096, n_points: int = 4096) -> float:
        """Spearman correlation between the discriminator's logit and the exact log p_sigma/q_sigma on
        held-out noised points (half teacher data, half fresh student samples), q_sigma being the
        noised mixture of a batch of `n_batch` student samples (`fdistill.evaluation.ratio`).
        Sigmas are log-uniform in [distill.ratio_eval_sigma_min, distill.ratio_eval_sigma_max]."""
        gmm = self.source.gmm
        k_b, k_q, k_s, k_e = jax.random.split(key, 4)
        batch, _ = self.student_samples(params["gen"], k_b, n_batch)
        fake, _ = self.student_samples(params["gen"], k_q, n_points // 2)
        real = self.source.reference(n_points - n_points // 2, seed=4242)
        pts = jnp.asarray(np.concatenate([real, fake]), jnp.float32)
        lo = float(self.dc.get("ratio_eval_sigma_min", 0.05))
        hi = float(self.dc.get("ratio_eval_sigma_max", 2.0))
        sigma = jnp.exp(jax.random.uniform(k_s, (n_points,), minval=np.log(lo), maxval=np.log(hi)))
        y = pts + sigma[:, None] * jax.random.normal(k_e, pts.shape)
        critic = {"fake": params["fake"], "disc": params["disc"]}
        logits = self._jit("disc_logits", lambda c, y, s: self.disc_logits(c, y, s)[0])(critic, y, sigma)
        exact = ratio_lib.exact_log_ratio(gmm, batch, y, sigma)
        return ratio_lib.spearman(np.asarray(logits), np.asarray(exact))

    def evaluate(self, state, frozen, key):
        e = self.config.eval
        k_s, k_t, k_r = jax.random.split(key, 3)
        gen = state.params["gen"]
        self.student_samples(gen, k_s, min(e.num_samples, 256))  # compile outside the timed region
        t0 = time.perf_counter()
        x, labels = self.student_samples(gen, k_s, e.num_samples)
        elapsed = time.perf_counter() - t0
        metrics = dict(self.source.evaluate_samples(x, labels))
        metrics["nfe"] = 1.0
        metrics["samples_per_sec"] = e.num_samples / elapsed
        metrics.update(self._teacher_metrics(frozen, k_t, labels))
        metrics["speedup"] = metrics["samples_per_sec"] / metrics["teacher/samples_per_sec"]
        if hasattr(self.source, "gmm") and self.use_disc:
            metrics["ratio_spearman"] = self.ratio_spearman(state.params, k_r)
        self._last_samples = x
        return metrics

    def plot(self, state, frozen, plot_dir, step):
        x = getattr(self, "_last_samples", None)
        if x is None:
            x, _ = self.student_samples(state.params["gen"], jax.random.key(0), self.config.eval.num_samples)
        path = os.path.join(plot_dir, f"samples_{step:07d}.png")
        title = f"1-step student ({self.div.name}), step {step}"
        return [self.source.plot_samples(x, path, title)]
