"""Student samplers: how the generator samples, and which training point an update differentiates.

Every student shares one interface, used by the objective and the critic alike:

    student.num_steps                         NFE of its sampler
    student.draws(key, b, progress)           the randomness of b training points (progress: the
                                              fraction of training done, for a moving noise range)
    student.train_point(gen_params, draws)    {'x': the sample the update differentiates,
                                               'noise', 'sigma', 'index': x_t = x + sigma * noise at
                                               Karras-grid index 'index', 'step': the student step
                                               that produced x, 'labels'} (+ 'fake_weight' for TDM)
    student.sample(gen_params, z, labels)     the sampler (evaluation)

* `OneStep` (f-distill, DMD2): x = G(z) = D_gen(sigma_g z; sigma_g), sigma on the grid indices
  [gen_index_min, gen_index_max] uniformly, noise ~ N(0, I).
* `BackwardSimulation` (DMD2 section 4.4, arXiv 2405.14867): a K-step sampler that re-noises with
  fresh noise, x_{i+1} = x0_i + sigma_{i+1} n_i. A training point picks a step k ~ U{0..K-1} per
  example; steps 0..k-1 run without gradient from pure noise (the generator's own rollout: no
  teacher, no data), and x = D_gen(x_k; sigma_k) is the one differentiated call. With K = 1 it is
  `OneStep` exactly.
* `TrajectorySegments` (TDM, arXiv 2503.06674; read from `Luo-Yihong/TDM/train_tdm_demo.py`): a
  deterministic K-step sampler that re-noises with the predicted noise (VE DDIM),
  x_{i+1} = x0_i + sigma_{i+1} eps_i, eps_i = (x_i - x0_i) / sigma_i. A training point takes the
  segment k ~ U{0..K-1}, x = x0_theta = D_gen(x_k; sigma_k) and a level sigma drawn on the grid
  inside the segment [sigma_{k+1}, sigma_k) (clamped to [gen_index_min, gen_index_max]) with
      x_t = x0_theta + sigma_mid eps_theta + sqrt(sigma^2 - sigma_mid^2) xi = x0_theta + sigma n~,
  sigma_mid = sigma_{k+1} (sigma_K = 0), the "mixed noise" n~ = (x_t - x0_theta) / sigma. The fake
  score trains on the same points with TDM's weight min(1/sigma^2, c) w_IS, the importance weight
  w_IS = exp(-mean(n~^2) / 2) / exp(-mean(xi^2) / 2) exactly as in the reference code.
  Simplifications: EDM VE noise instead of the DDPM schedule; sigma_mid is the next boundary (TDM's
  `--use_randmid` is not implemented); no classifier-free guidance; no pseudo-Huber loss.

The K student noise levels (`distill.student_sigmas='karras'`) are the first K of K + 1 Karras
points (arXiv 2206.00364 eq. 5) from `distill.gen_sigma` down to `diffusion.sigma_min`: K = 1: [80],
K = 2: [80, 2.53], K = 4: [80, 17.6, 2.53, 0.171].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import configs, diffusion
from fdistill.denoiser import Denoiser, build_denoiser

SIGMA_SCHEDULES = ("karras",)


class NoiseLevels:
    """The ascending Karras grid of distillation noise levels (index 0 = sigma_min, as in DMD2) and
    the index range [gen_index_min, gen_index_max] of the generator and discriminator.

    With `distill.gen_index_max_end` >= 0 the upper index moves linearly with training progress p
    (update / train.num_steps, in [0, 1]) from gen_index_max to gen_index_max_end,
        hi(p) = round(gen_index_max + p (gen_index_max_end - gen_index_max)),
    wide early (every mode in view), narrow late (sharp modes); `lo`/`hi` stay the widest range
    (ratio bins, TDM's segments)."""

    def __init__(self, distill_config, diffusion_config):
        dc, d = distill_config, diffusion_config
        n = int(dc.num_sigmas)
        self.grid = jnp.flip(diffusion.karras_sigmas(n, d.sigma_min, d.sigma_max, d.rho)[:n])
        self.lo, self.hi = int(dc.gen_index_min), int(dc.gen_index_max)
        if not 0 <= self.lo <= self.hi < n:
            raise configs.ConfigError(f"config.distill.gen_index_min/max=({self.lo}, {self.hi}) must satisfy "
                             f"0 <= min <= max < num_sigmas={n}")
        end = int(dc.get("gen_index_max_end", -1))
        if end >= 0 and not self.lo <= end <= self.hi:
            raise configs.ConfigError(f"config.distill.gen_index_max_end={end} must lie in [gen_index_min, gen_index_max] = "
                             f"[{self.lo}, {self.hi}] (or be -1: a fixed range)")
        self.hi_end = end if end >= 0 else None

    @property
    def hi_final(self) -> int:
        """The upper index at the last update (gen_index_max_end, or gen_index_max for a fixed range)."""
        return self.hi if self.hi_end is None else self.hi_end

    def draw_index(self, key, b: int, progress=None) -> jax.Array:
        """b grid indices uniform in [lo, hi(progress)] (`progress` None: [lo, hi])."""
        if self.hi_end is None or progress is None:
            return jax.random.randint(key, (b,), self.lo, self.hi + 1)
        p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
        hi = jnp.round(self.hi + p * (self.hi_end - self.hi)).astype(jnp.int32)
        return jax.random.randint(key, (b,), self.lo, hi + 1)


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
        raise configs.ConfigError(f"config.distill.student_sigmas={spec!r} must be one of {list(SIGMA_SCHEDULES)} "
                         "or K comma-separated floats") from None
    s = np.asarray(vals, np.float32)
    if len(s) != num_steps or np.any(s <= 0) or np.any(np.diff(s) >= 0):
        raise configs.ConfigError(f"config.distill.student_sigmas={spec!r} must be {num_steps} (= num_student_steps) "
                         "strictly decreasing positive floats")
    return s


def select_step(xs: list, k: jax.Array) -> jax.Array:
    """xs[k_b][b] per example b (xs: list of K arrays [B, ...], k: [B] int)."""
    out = xs[0]
    for i in range(1, len(xs)):
        out = jnp.where(diffusion.expand(k == i, out), xs[i], out)
    return out


LATENT_FIELDS = ("latent_dim", "latent_categories")  # the config.distill fields that change z's shape
# The flags that give a z of the data's shape, for error messages.
DATA_SHAPED_FLAGS = " ".join(f"--config.{field}={value:g}" for field, value in configs.DATA_SHAPED_LATENT.items())


def require_data_shaped_latent(distill_config, who: str) -> None:
    """A ValueError naming `distill.latent_dim`, `latent_categories` or `latent_continuous_scale` when
    one is set (`who` needs a z of the data's shape)."""
    for field in LATENT_FIELDS:
        if distill_config[field]:
            raise configs.ConfigError(f"config.distill.{field} must be 0 for {who} (pass {DATA_SHAPED_FLAGS})")
    if float(distill_config.latent_continuous_scale) != 1.0:
        raise configs.ConfigError(f"config.distill.latent_continuous_scale must be 1 for {who} (pass {DATA_SHAPED_FLAGS})")


def importance_weight(mixed: jax.Array, xi: jax.Array) -> jax.Array:
    """TDM's w_IS = exp(-mean(n~^2)/2) / exp(-mean(xi^2)/2), means over the features ([B])."""
    axes = tuple(range(1, mixed.ndim))
    return jnp.exp(-0.5 * (jnp.mean(mixed**2, axis=axes) - jnp.mean(xi**2, axis=axes)))


class OneStep:
    """G(z) = D_gen(sigma_g z; sigma_g) (see the module docstring).

    With `distill.latent_dim` = m larger than the data dimension d (vector data, a generator that
    does not start from a teacher network), z has m dimensions and the same preconditioning skips
    through z's first d: G(z) = c_skip sigma_g z[:d] + c_out F(c_in sigma_g z; c_noise). A wider
    latent lets the continuous map place disjoint 2-D modes without folding the plane onto a curve
    (`experiments/results/student_quality.md`).

    With `distill.latent_categories` = C > 0, z has one more coordinate u ~ N(0, 1), quantised into a
    uniform category c = floor(C Phi(u)) (Phi the normal CDF) that the network sees as a one-hot:
    G(z) = c_skip sigma_g z[:d] + c_out F([c_in sigma_g z[:-1], onehot_C(c)]; c_noise). A continuous
    map of a connected latent puts mass on every path between disjoint modes (Khayatkhoei et al.,
    "Disconnected manifold learning for GANs", arXiv 1806.00880); a discrete latent need not, since
    each category can land in one mode. z stays standard normal, so every caller draws it as before.
    With `distill.latent_continuous_scale` = s the continuous part enters as s c_in sigma_g z[:-1]:
    with s = 0.1 the category decides where a sample lands and z only its spread, so the generator
    starts as C small clusters that move like particles and each settles in a mode. Measured on the
    10-mode ring (`experiments/results/student_quality.md`): with C = 64 and s = 1 no better than
    without categories (hq 0.84; the network ignores the one-hot); with C = 256 and s = 0.1 coverage
    1.0, TV 0.027 and hq 1.000. Elsewhere its mode weights were off (TV up to 0.083), because a settled
    cluster does not cross to another mode at noise levels below the mode spacing; distillation noise
    levels that start above it and narrow (`gen_index_max` 500 -> `gen_index_max_end` 350, sigma 2.5 ->
    0.57) let clusters move between modes while they settle: TV 0.028-0.044 on ring 8, random 12 and
    grid 16 (gmm_fdistill.py's defaults).
    """

    def __init__(self, denoiser: Denoiser, levels: NoiseLevels, shape, num_classes: int, conditional: bool,
                 distill_config, diffusion_config):
        self.denoiser, self.levels = denoiser, levels
        self.shape, self.num_classes, self.conditional = tuple(shape), int(num_classes), conditional
        self.gen_sigma = float(distill_config.gen_sigma)
        self.num_steps = 1
        self.sigmas = np.array([self.gen_sigma], np.float32)
        m = int(distill_config.latent_dim)
        if m and (len(self.shape) != 1 or m < self.shape[0]):
            raise configs.ConfigError(f"config.distill.latent_dim={m} needs vector data and at least the data's dimension "
                             f"(data shape {self.shape}); 0 = the data's")
        self.categories = int(distill_config.latent_categories)
        if self.categories < 0 or (self.categories and (len(self.shape) != 1 or self.categories == 1)):
            raise configs.ConfigError(f"config.distill.latent_categories={self.categories} must be 0 (none) or >= 2 "
                             f"with vector data (data shape {self.shape})")
        continuous = (m,) if m else self.shape
        self.latent_shape = (continuous[0] + 1,) if self.categories else continuous
        self.continuous_scale = float(distill_config.latent_continuous_scale)
        if self.continuous_scale <= 0 or (self.continuous_scale != 1.0 and not self.categories):
            raise configs.ConfigError(f"config.distill.latent_continuous_scale={self.continuous_scale} must be > 0, and "
                             "differ from 1 only with config.distill.latent_categories > 0 (it scales z beside them; "
                             f"a z of the data's shape: {DATA_SHAPED_FLAGS})")

    @property
    def plain(self) -> bool:
        """True when z has the data's shape (no category coordinate, no wider latent) and goes through
        the denoiser's own preconditioning."""
        return self.latent_shape == self.shape

    def net_input(self, z) -> jax.Array:
        """The network's input c_in sigma_g z (and the one-hot category, `latent_categories`, beside
        s c_in sigma_g z[:-1] with s = `latent_continuous_scale`)."""
        s = self.gen_sigma
        c_in = diffusion.preconditioning(jnp.float32(s), self.denoiser.sigma_data)[2]
        if not self.categories:
            return c_in * s * z
        u = jax.scipy.stats.norm.cdf(z[:, -1])
        c = jnp.clip(jnp.floor(u * self.categories), 0, self.categories - 1).astype(jnp.int32)
        return jnp.concatenate([self.continuous_scale * c_in * s * z[:, :-1],
                                jax.nn.one_hot(c, self.categories, dtype=z.dtype)], axis=1)

    def init(self, key):
        """Fresh generator parameters (a generator that does not start from a teacher)."""
        x = self.net_input(jnp.zeros((1,) + self.latent_shape, jnp.float32))  # only its shape matters
        return self.denoiser.init(key, x, **self.kw(jnp.zeros((1,), jnp.int32)))

    def kw(self, labels) -> dict:
        return {"labels": labels} if self.conditional else {}

    def draw_labels(self, key, b: int) -> jax.Array:
        return jax.random.randint(key, (b,), 0, max(self.num_classes, 1))

    def draws(self, key, b: int, progress=None) -> dict:
        """z, labels, the grid index of sigma (its range at training `progress`, `NoiseLevels`) and
        the noise of x_t."""
        k_z, k_lab, k_i, k_e = jax.random.split(key, 4)
        return {"z": jax.random.normal(k_z, (b,) + self.latent_shape), "labels": self.draw_labels(k_lab, b),
                "index": self.levels.draw_index(k_i, b, progress), "eps": jax.random.normal(k_e, (b,) + self.shape)}

    def generate_at(self, gen_params, x, sigma, labels) -> jax.Array:
        return self.denoiser(gen_params, x, sigma, **self.kw(labels))

    def sample(self, gen_params, z, labels=None) -> jax.Array:
        s = self.gen_sigma
        if self.plain:
            return self.generate_at(gen_params, s * z, jnp.full(z.shape[:1], s), labels)
        c_skip, c_out, _, c_noise = diffusion.preconditioning(jnp.float32(s), self.denoiser.sigma_data)
        f = self.denoiser.apply_net(gen_params, self.net_input(z), jnp.full(z.shape[:1], c_noise), **self.kw(labels))
        return c_skip * s * z[:, :self.shape[0]] + c_out * f.astype(z.dtype)

    def train_point(self, gen_params, draws: dict) -> dict:
        b = draws["z"].shape[0]
        return {"x": self.sample(gen_params, draws["z"], draws["labels"]), "noise": draws["eps"],
                "sigma": self.levels.grid[draws["index"]], "index": draws["index"],
                "step": jnp.zeros((b,), jnp.int32), "labels": draws["labels"]}


class _KStep(OneStep):
    """The K-step sampler shared by backward simulation and TDM: schedule, rollout, NFE = K."""

    stochastic = True  # re-noise with fresh noise (DMD2) or with the predicted noise (TDM)

    def __init__(self, denoiser, levels, shape, num_classes, conditional, distill_config, diffusion_config):
        super().__init__(denoiser, levels, shape, num_classes, conditional, distill_config, diffusion_config)
        K = distill_config.num_student_steps
        if not isinstance(K, (int, np.integer)) or K < 1:
            raise configs.ConfigError(f"config.distill.num_student_steps must be an integer >= 1, got {K!r}")
        require_data_shaped_latent(distill_config, "few-step students: every step after the first denoises a "
                                   "data-shaped x_k with the same network")
        self.num_steps = int(K)
        self.sigmas = student_sigmas(self.num_steps, distill_config.student_sigmas, self.gen_sigma,
                                     float(diffusion_config.sigma_min), float(diffusion_config.rho))
        self.sampler_seed = int(distill_config.sampler_seed)

    def renoise(self, x, x0, i: int, noise_i):
        """x_{i+1} from step i's prediction: fresh noise (DMD2) or the predicted one (DDIM, TDM)."""
        s_next = float(self.sigmas[i + 1])
        if self.stochastic:
            return x0 + s_next * noise_i
        return x0 + (s_next / float(self.sigmas[i])) * (x - x0)

    def trajectory(self, gen_params, z, labels=None, noise=None) -> list:
        """States x_0 = sigma_0 z, ..., x_{K-1} of the K-step sampler (no gradient)."""
        p = jax.lax.stop_gradient(gen_params)
        x = self.sigmas[0] * z
        xs = [x]
        for i in range(self.num_steps - 1):
            x0 = self.generate_at(p, x, jnp.full(z.shape[:1], self.sigmas[i]), labels)
            x = jax.lax.stop_gradient(self.renoise(x, x0, i, None if noise is None else noise[i]))
            xs.append(x)
        return xs

    def rollout_start(self, gen_params, z, labels, k: jax.Array, noise=None):
        """(x_k, sigma_k) per example: the generator's rollout from x_0 = sigma_0 z stopped at its step k
        (no gradient; `noise` [K-1, B, ...] is the fresh re-noising noise or None)."""
        xs = self.trajectory(gen_params, z, labels, noise)
        return select_step(xs, k), jnp.asarray(self.sigmas)[k]

    def _eval_noise(self, z):
        """Fresh re-noising noise of the sampler, keyed by z's bits (every chunk of z differs)."""
        flat = z.reshape(-1)
        bits = jax.lax.bitcast_convert_type(flat[jnp.array([0, flat.shape[0] - 1])].astype(jnp.float32), jnp.uint32)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.sampler_seed), bits[0]), bits[1])
        return jax.random.normal(key, (self.num_steps - 1,) + z.shape, z.dtype)

    def sample(self, gen_params, z, labels=None):
        """The K-step sampler (NFE = K): x_0 = sigma_0 z, then K denoiser calls with re-noising."""
        noise = self._eval_noise(z) if (self.stochastic and self.num_steps > 1) else None
        x_last = self.trajectory(gen_params, z, labels, noise)[-1]
        return self.generate_at(gen_params, x_last, jnp.full(z.shape[:1], self.sigmas[-1]), labels)

    def draws(self, key, b: int, progress=None) -> dict:
        """The one-step draws plus the step k [B] and the re-noising noise [K-1, B, ...]."""
        d = super().draws(key, b, progress)
        k_k, k_n = jax.random.split(jax.random.fold_in(key, 1))
        d["k"] = jax.random.randint(k_k, (b,), 0, self.num_steps)
        if self.stochastic and self.num_steps > 1:
            d["noise"] = jax.random.normal(k_n, (self.num_steps - 1, b) + self.shape)
        return d


class BackwardSimulation(_KStep):
    """DMD2's K-step generator trained on its own backward-simulated inputs (module docstring)."""

    stochastic = True

    def train_point(self, gen_params, draws: dict) -> dict:
        x_k, sigma_k = self.rollout_start(gen_params, draws["z"], draws["labels"], draws["k"], draws.get("noise"))
        return {"x": self.generate_at(gen_params, x_k, sigma_k, draws["labels"]), "noise": draws["eps"],
                "sigma": self.levels.grid[draws["index"]], "index": draws["index"], "step": draws["k"],
                "labels": draws["labels"]}


class TrajectorySegments(_KStep):
    """TDM: sampling-steps-aware matching along the student's deterministic trajectory."""

    stochastic = False

    def __init__(self, denoiser, levels, shape, num_classes, conditional, distill_config, diffusion_config):
        super().__init__(denoiser, levels, shape, num_classes, conditional, distill_config, diffusion_config)
        if levels.hi_end is not None:
            raise configs.ConfigError("config.distill.gen_index_max_end must be -1 for TDM: its trajectory segments fix "
                             "the noise range of each step")
        self.snr_clip = float(distill_config.tdm_snr_clip)
        self.use_is = bool(distill_config.tdm_importance_weight)
        grid = np.asarray(levels.grid)
        ext = np.concatenate([self.sigmas, [0.0]])
        # Karras-index range of each segment k: sigma in [sigma_{k+1}, sigma_k), within [lo, hi].
        lo = np.clip(np.searchsorted(grid, ext[1:], side="left"), levels.lo, levels.hi)
        hi = np.clip(np.searchsorted(grid, ext[:-1], side="left") - 1, lo, levels.hi)
        self.segment_lo, self.segment_hi = lo.astype(np.int32), hi.astype(np.int32)
        self.sigmas_ext = ext.astype(np.float32)

    def draws(self, key, b, progress=None):
        """The K-step draws with the grid index drawn inside segment k (`progress` is not used:
        the segments fix the range)."""
        d = super().draws(key, b)
        k = d["k"]
        lo, hi = jnp.asarray(self.segment_lo)[k], jnp.asarray(self.segment_hi)[k]
        d["index"] = jax.random.randint(jax.random.fold_in(key, 2), (b,), lo, hi + 1)
        return d

    def train_point(self, gen_params, draws: dict) -> dict:
        """x = x0_theta = D_gen(x_k; sigma_k) (differentiated) and TDM's x_t = x + sigma n~."""
        z, labels, k = draws["z"], draws["labels"], draws["k"]
        x_k, sigma_k = self.rollout_start(gen_params, z, labels, k)
        x0 = self.generate_at(gen_params, x_k, sigma_k, labels)
        x0_sg = jax.lax.stop_gradient(x0)
        eps_theta = (x_k - x0_sg) / diffusion.expand(sigma_k, x_k)
        sigma_mid = jnp.asarray(self.sigmas_ext)[k + 1]
        sigma = self.levels.grid[draws["index"]]
        xi = draws["eps"]
        spread = jnp.sqrt(jnp.maximum(sigma**2 - sigma_mid**2, 0.0))
        offset = diffusion.expand(sigma_mid, x0) * eps_theta + diffusion.expand(spread, x0) * xi
        mixed = jax.lax.stop_gradient(offset / diffusion.expand(sigma, x0))
        w_is = importance_weight(mixed, xi) if self.use_is else jnp.ones(sigma.shape, jnp.float32)
        fake_weight = jnp.minimum(1.0 / sigma**2, self.snr_clip) * jax.lax.stop_gradient(w_is)
        return {"x": x0, "noise": mixed, "sigma": sigma, "index": draws["index"], "step": k, "labels": labels,
                "fake_weight": fake_weight, "w_is": w_is}


STUDENTS = {"distill": OneStep, "dmd2_multistep": BackwardSimulation, "tdm": TrajectorySegments}


def generator_denoiser(teacher, config, shape) -> Denoiser:
    """The generator's network: the teacher's architecture, with `distill.gen_out_init` replacing
    its output initialisation (a fresh generator only)."""
    init = config.distill.gen_out_init
    if not init:
        return teacher.denoiser
    if teacher.starts_students:
        raise configs.ConfigError("config.distill.gen_out_init needs a fresh generator (config.distill.teacher='analytic'); "
                         "a network teacher's generator copies its weights")
    cfg = teacher.net_config.copy_and_resolve_references()
    if "out_init" not in cfg.model:
        raise configs.ConfigError(f"config.distill.gen_out_init: model {cfg.model.name!r} has no out_init option")
    cfg.model.out_init = init
    return build_denoiser(cfg, shape)


def build(objective: str, teacher, levels, shape, num_classes, conditional, config):
    """The student sampler of objective `objective` ('distill', 'dmd2_multistep' or 'tdm')."""
    dc = config.distill
    if objective == "distill" and dc.num_student_steps != 1:
        raise configs.ConfigError(f"config.distill.num_student_steps={dc.num_student_steps} needs a few-step "
                         "objective: config.objective='dmd2_multistep' or 'tdm' ('distill' is one-step)")
    for field in LATENT_FIELDS:
        if dc[field] and teacher.starts_students:
            raise configs.ConfigError(f"config.distill.{field} needs a fresh generator (config.distill.teacher='analytic'); "
                             f"a network teacher's generator copies its weights and input size: pass "
                             f"{DATA_SHAPED_FLAGS}")
    denoiser = generator_denoiser(teacher, config, shape)
    if any(dc[field] for field in LATENT_FIELDS) and type(denoiser) is not Denoiser:
        raise configs.ConfigError("config.distill.latent_dim and latent_categories skip z through the EDM preconditioning: "
                         "they need config.model.parametrisation='edm'")
    return STUDENTS[objective](denoiser, levels, shape, num_classes, conditional, dc, config.diffusion)
