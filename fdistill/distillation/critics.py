"""The critic: what the distillation knows about the student's own distribution q_t.

`LearnedCritic` holds two estimates, trained on the student's samples while the generator trains:

* the fake score D_fake(x_t; sigma) ~ E_q[x_0 | x_t] (DMD2, arXiv 2405.14867): denoising score
  matching on stop-gradient student samples,
      L_fake = E[ w(sigma) mean_features (D_fake(x + sigma n; sigma) - x)^2 ],
  with `distill.fake_loss='edm'`: w = lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
  (EDM eq. 8) or `'x0_mse'`: w = 1 (FastGen's `common_loss.py`), sigma from `distill.fake_sigma`
  (the 1000-point Karras grid uniformly, or EDM's log-normal). A student that brings its own
  training targets (TDM's trajectory points, `point['fake_weight']`) replaces that noising;
* the discriminator, whose logit estimates log r = log p_t / q_t (density-ratio trick), trained
  with the logistic loss on noised data vs the student's training points. Its trunk is
  `distill.disc_on`: `'fake_score'` (a head on the fake score's hidden features, DMD2's classifier
  branch: the discriminator loss also trains the fake score), `'separate'` (its own network) or
  `'teacher'` (FastGen: `distill.disc_heads` heads on the frozen teacher's features, logits
  averaged before exp).

`distill.step_aware_critic=True` conditions both on the student step that produced a sample (for
few-step students): the fake score network gets one class embedding per (class, step), so each
step's output distribution has its own score.

`OracleCritic` (`distill.critic='oracle'`, analytic mixture teacher) knows q exactly instead:
the score and ratio of the noised kernel density of fresh student samples (`distillation.oracle`).
It has nothing to train; it measures how much of a student's error is the learned critic's.

Both give the generator update its two terms through `generator_terms`: (logit ~ log r, D_fake).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill import diffusion
from fdistill.configs import ConfigError
from fdistill.denoiser import build_denoiser
from fdistill.distillation import losses, oracle

DISC_ON = ("fake_score", "separate", "teacher")
FAKE_LOSSES = ("edm", "x0_mse")
FAKE_SIGMAS = ("karras", "lognormal")


def choice(value, allowed, field):
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {list(allowed)}")
    return value


class DiscriminatorHead(nn.Module):
    """Logit of "real" from hidden features: flattens [B, ...] features (MLP [B, c] or a U-Net
    bottleneck [B, h, w, c]), then an MLP per head; the heads' logits are averaged."""

    hidden: int = 128
    depth: int = 2
    num_heads: int = 1

    @nn.compact
    def __call__(self, feats: jax.Array) -> jax.Array:
        flat = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
        logits = []
        for _ in range(self.num_heads):
            h = flat
            for _ in range(self.depth):
                h = nn.silu(nn.Dense(self.hidden)(h))
            logits.append(nn.Dense(1)(h)[:, 0])
        return sum(logits) / self.num_heads


class LearnedCritic:
    """Fake score + discriminator (module docstring); parameters {'fake': ..., 'disc': ...}."""

    learned = True

    def __init__(self, config, teacher, student, levels, use_disc: bool):
        dc = config.distill
        self.config, self.teacher, self.student, self.levels = config, teacher, student, levels
        self.use_disc = use_disc
        self.disc_on = choice(dc.disc_on, DISC_ON, "config.distill.disc_on")
        self.fake_loss = choice(dc.fake_loss, FAKE_LOSSES, "config.distill.fake_loss")
        self.fake_sigma = choice(dc.fake_sigma, FAKE_SIGMAS, "config.distill.fake_sigma")
        if use_disc and self.disc_on == "teacher" and not teacher.has_features:
            teacher.features(None, None, None)  # raises the explanatory error
        if dc.disc_heads < 1:
            raise ConfigError(f"config.distill.disc_heads must be >= 1, got {dc.disc_heads}")
        self.step_aware = bool(dc.step_aware_critic) and student.num_steps > 1
        self.denoiser = self._fake_denoiser(teacher.net_config, student)
        if self.disc_on == "separate":
            self.disc_net = build_denoiser(teacher.net_config, student.shape)
        self.head = DiscriminatorHead(dc.disc_hidden, dc.disc_depth, dc.disc_heads if self.disc_on == "teacher" else 1)
        self.sigma_data = teacher.sigma_data
        self.disc_weight = float(dc.disc_loss_weight)

    def _fake_denoiser(self, net_config, student):
        if not self.step_aware:
            return self.teacher.denoiser  # the teacher's architecture
        cfg = net_config.copy_and_resolve_references()
        cfg.model.num_classes = self.num_conditions(student)
        return build_denoiser(cfg, student.shape)

    @staticmethod
    def num_conditions(student) -> int:
        return max(student.num_classes if student.conditional else 1, 1) * student.num_steps

    # ----- conditioning ----------------------------------------------------------------------
    def kw(self, labels, step, n: int | None = None) -> dict:
        """Network keywords: the class labels, and with a step-aware critic the (label, step) pair.
        `step=None` (evaluation: the samples are the sampler's output) means the last step."""
        if not self.step_aware:
            return self.student.kw(labels)
        if step is None:
            step = jnp.full((n,), self.student.num_steps - 1, jnp.int32)
        base = labels if self.student.conditional else jnp.zeros_like(step)
        return {"labels": base * self.student.num_steps + step}

    # ----- parameters ------------------------------------------------------------------------
    def init(self, key, frozen_teacher) -> dict:
        k_fake, k_trunk, k_head = jax.random.split(key, 3)
        x = jnp.zeros((1,) + self.student.shape, jnp.float32)
        kw = self.kw(jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
        fake = self.denoiser.init(k_fake, x, **kw)
        if self.teacher.starts_students:  # DMD2: the fake score starts from the teacher
            fake = copy_matching(frozen_teacher, fake)
        disc = {}
        if self.disc_on == "separate":
            disc["trunk"] = self.disc_net.init(k_trunk, x, **self.student.kw(kw.get("labels")))
        feats = jax.eval_shape(lambda p, f: self.features(p, f, x, jnp.ones((1,)), kw), {"fake": fake, "disc": disc},
                               frozen_teacher)
        disc["head"] = self.head.init(k_head, jnp.zeros(feats.shape, jnp.float32))["params"]
        return {"fake": fake, "disc": disc}

    # ----- evaluations -----------------------------------------------------------------------
    def fake_denoise(self, params, x_t, sigma, labels=None, step=None) -> jax.Array:
        return self.denoiser(params["fake"], x_t, sigma, **self.kw(labels, step, x_t.shape[0]))

    def features(self, params, frozen_teacher, x_t, sigma, kw):
        if self.disc_on == "fake_score":
            return self.denoiser.with_features(params["fake"], x_t, sigma, **kw)[1]
        if self.disc_on == "separate":
            return self.disc_net.with_features(params["disc"]["trunk"], x_t, sigma, **self.student.kw(kw.get("labels")))[1]
        return self.teacher.features(frozen_teacher, x_t, sigma, **self.student.kw(kw.get("labels")))

    def logits(self, params, frozen_teacher, x_t, sigma, labels=None, step=None, with_fake: bool = False):
        """(logit of "real" at (x_t, sigma), D_fake(x_t; sigma) when `with_fake` else None)."""
        kw = self.kw(labels, step, x_t.shape[0])
        d_fake = None
        if self.disc_on == "fake_score":
            d_fake, feats = self.denoiser.with_features(params["fake"], x_t, sigma, **kw)
        else:
            feats = self.features(params, frozen_teacher, x_t, sigma, kw)
            if with_fake:
                d_fake = self.fake_denoise(params, x_t, sigma, labels, step)
        return self.head.apply({"params": params["disc"]["head"]}, feats), d_fake

    def generator_terms(self, params, frozen_teacher, x_t, sigma, labels, step, key, need_logits: bool):
        """(logit of "real" or None, D_fake) at the generator's noised samples (`key` is unused)."""
        if need_logits:
            return self.logits(params, frozen_teacher, x_t, sigma, labels, step, with_fake=True)
        return None, self.fake_denoise(params, x_t, sigma, labels, step)

    # ----- the loss --------------------------------------------------------------------------
    def fake_targets(self, point, key):
        """(x_t, sigma, per-example weight) of the fake score's regression onto sg(point['x'])."""
        x = point["x"]
        if "fake_weight" in point:
            return x + diffusion.expand(point["sigma"], x) * point["noise"], point["sigma"], point["fake_weight"]
        b = x.shape[0]
        k_s, k_n = jax.random.split(key)
        if self.fake_sigma == "karras":
            sigma = self.levels.grid[jax.random.randint(k_s, (b,), 0, self.levels.grid.shape[0])]
        else:
            d = self.config.diffusion
            sigma = diffusion.sample_lognormal_sigma(k_s, (b,), d.p_mean, d.p_std)
        weight = diffusion.loss_weight(sigma, self.sigma_data) if self.fake_loss == "edm" else jnp.ones_like(sigma)
        return x + diffusion.expand(sigma, x) * jax.random.normal(k_n, x.shape), sigma, weight

    def loss(self, params, frozen_teacher, point, x_real, labels_real, key):
        """L_fake + disc_loss_weight * L_D on one batch of stop-gradient student training points
        `point` and real data; returns (loss, metrics)."""
        point = jax.lax.stop_gradient(point)
        x, labels, step = point["x"], point["labels"], point["step"]
        b = x.shape[0]
        k_fake, k_ir, k_er = jax.random.split(key, 3)
        x_dsm, s_dsm, weight = self.fake_targets(point, k_fake)
        metrics = {}
        if "w_is" in point:
            metrics.update({"tdm/w_is_mean": jnp.mean(point["w_is"]), "tdm/w_is_max": jnp.max(point["w_is"])})
        axes = tuple(range(1, x.ndim))
        if not self.use_disc:
            d = self.fake_denoise(params, x_dsm, s_dsm, labels, step)
            l_fake = jnp.mean(weight * jnp.mean((d - x) ** 2, axis=axes))
            return l_fake, {"loss_fake": l_fake, **metrics}
        s_r = self.levels.grid[self.levels.draw_index(k_ir, b, point.get("progress"))]
        xt_r = x_real + diffusion.expand(s_r, x_real) * jax.random.normal(k_er, x_real.shape)
        xt_f = x + diffusion.expand(point["sigma"], x) * point["noise"]
        step_r = step  # a step-aware discriminator compares data with each step's samples: same step labels
        if self.disc_on == "fake_score":
            # One pass of the fake-score network over [DSM inputs; noised fake; noised real]: the same
            # losses as three separate calls, with fewer (larger) matmuls.
            kw = self.kw(jnp.concatenate([labels, labels, labels_real]), jnp.concatenate([step, step, step_r]))
            d_all, feats = self.denoiser.with_features(params["fake"], jnp.concatenate([x_dsm, xt_f, xt_r]),
                                                       jnp.concatenate([s_dsm, point["sigma"], s_r]), **kw)
            l_fake = jnp.mean(weight * jnp.mean((d_all[:b] - x) ** 2, axis=axes))
            logits = self.head.apply({"params": params["disc"]["head"]}, feats[b:])
            logit_f, logit_r = logits[:b], logits[b:]
        else:
            d = self.fake_denoise(params, x_dsm, s_dsm, labels, step)
            l_fake = jnp.mean(weight * jnp.mean((d - x) ** 2, axis=axes))
            logit_f, _ = self.logits(params, frozen_teacher, xt_f, point["sigma"], labels, step)
            logit_r, _ = self.logits(params, frozen_teacher, xt_r, s_r, labels_real, step_r)
        metrics.update({"loss_fake": l_fake, **losses.disc_metrics(logit_r, logit_f)})
        return l_fake + self.disc_weight * metrics["loss_disc"], metrics


def copy_matching(source, target):
    """`target` with every leaf that `source` has at the same path and shape replaced by the source's.

    For a step-aware fake score started from the teacher, the class embedding has K rows per teacher
    class (row label * K + step): each teacher row is repeated K times, and an unconditional
    teacher's missing embedding starts at zero, so the copy computes the teacher's function."""
    flat_src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}

    def pick(path, leaf):
        name = jax.tree_util.keystr(path)
        src = flat_src.get(name)
        if src is not None and src.shape == leaf.shape:
            return jnp.array(src)
        if "embedding" in name:
            if src is None:
                return jnp.zeros_like(leaf)
            if src.shape[1:] == leaf.shape[1:] and leaf.shape[0] % src.shape[0] == 0:
                return jnp.repeat(jnp.asarray(src), leaf.shape[0] // src.shape[0], axis=0)
        if src is None:
            return leaf
        raise ValueError(f"cannot start the fake score from the teacher: {name} has shape {leaf.shape}, "
                         f"the teacher's {src.shape}")

    return jax.tree_util.tree_map_with_path(pick, target)


class OracleCritic:
    """The exact critic on the analytic mixture (module docstring): D_fake and log r of the noised
    kernel density of `distill.oracle_samples` fresh student training points (stop-gradient, drawn
    independently of the points being updated, from the generator's current parameters)."""

    learned = False

    def __init__(self, config, teacher, student, use_disc: bool):
        if config.distill.teacher != "analytic" or len(student.shape) != 1:
            raise ConfigError("config.distill.critic='oracle' needs config.distill.teacher='analytic' (an exact "
                             "teacher density) and vector data")
        if config.distill.oracle_samples < 1:
            raise ConfigError(f"config.distill.oracle_samples must be >= 1, got {config.distill.oracle_samples}")
        self.student, self.use_disc = student, use_disc
        self.num_samples = int(config.distill.oracle_samples)

    def init(self, key, frozen_teacher) -> dict:
        return {"fake": {}, "disc": {}}  # nothing to train

    def samples(self, gen_params, key) -> jax.Array:
        """The kernel density's support: fresh stop-gradient training points of the student."""
        gen = jax.lax.stop_gradient(gen_params)
        return jax.lax.stop_gradient(self.student.train_point(gen, self.student.draws(key, self.num_samples))["x"])

    def generator_terms(self, params, gmm, x_t, sigma, labels, step, key, need_logits: bool):
        if key is None:
            raise ValueError("the oracle critic needs draws['critic_key'] (fresh samples for its density)")
        y = self.samples(params["gen"], key)
        logits = oracle.log_ratio(gmm.log_prob, y, x_t, sigma) if need_logits else None
        return logits, oracle.kde_denoiser(y, x_t, sigma)


CRITICS = ("learned", "oracle")


def build(config, teacher, student, levels, use_disc: bool):
    """The critic named by `config.distill.critic`."""
    if choice(config.distill.critic, CRITICS, "config.distill.critic") == "oracle":
        return OracleCritic(config, teacher, student, use_disc)
    return LearnedCritic(config, teacher, student, levels, use_disc)
