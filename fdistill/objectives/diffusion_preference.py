"""Diffusion preference optimisation: Diffusion-DPO, MaPO, and their noise-conditioned perceptual variants.

A preference pair (x_w, x_l) (winner, loser) is noised with ONE noise level sigma and ONE noise
draw eps shared by both samples (as the public Diffusion-DPO and MaPO code does), and each model's
*denoising error* is

    err(x) = lambda(sigma) * mean_features || D(x + sigma eps; sigma) - x ||^2,
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,                (EDM eq. 8)

i.e. the per-example EDM training loss (arXiv 2206.00364, eq. 8; `score.edm_dsm_loss`). With this
weighting every noise level contributes an O(1) error, the EDM analogue of the unit-weighted
epsilon-prediction MSE ||eps - eps_theta||^2 that both public implementations use (for VE noising
||eps - eps_hat||^2 = ||D - x||^2 / sigma^2, so lambda differs from it by (1 + sigma^2/sigma_data^2)).
sigma ~ LogNormal(P_mean, P_std), the EDM training distribution (the analogue of t ~ U(0, T)).

Losses (per pair; the objective averages them over the batch):

* `diffusion_dpo` (Wallace et al., arXiv 2311.12908, eq. 14):
      L = -log sigmoid( -(beta / 2) [ (err_w^theta - err_w^ref) - (err_l^theta - err_l^ref) ] ).
  Eq. 14 writes the factor as beta * T * omega(lambda_t); the authors' public training script
  (SalesforceAIResearch/DiffusionDPO, `train.py`: `scale_term = -0.5 * args.beta_dpo`) folds T and
  omega into beta and keeps the 1/2 of the Gaussian log-likelihood, so our `beta` is their
  `beta_dpo` (2500-5000 for SD1.5/SDXL on per-pixel-mean MSEs).
* `mapo` (Hong et al., arXiv 2406.06424; public code mapo-t2i/mapo, `utils.py::compute_loss`):
      h(u) = u / (exp(u) - 1)                      (bounded odds link, h(0) = 1, h(inf) = 0)
      margin = h(s err_w) - h(s err_l)             (s = `snr_value`, 0.5 in the public code)
      L = err_w - beta * log sigmoid( T * margin ) (T = `margin_scale` = num_train_timesteps = 1000)
  The first term is the likelihood (SFT) term on the preferred sample; the second is the
  reference-free margin, large when the winner is denoised better than the loser. Defaults follow
  the public code's arguments (`beta_mapo` = 0.1, `snr_value` = 0.5).
* `perceptual` errors (Gambashidze et al., arXiv 2406.17636, "noise-conditioned perception"): the
  same losses with err replaced by a distance in the *frozen reference denoiser's* feature space.
  Following the self-perceptual objective that NCP builds on (Lin & Yang, arXiv 2401.00110), the
  prediction x0_hat = D(x + sigma eps; sigma) and the clean x are re-noised with a second shared
  draw (sigma', eps'), sigma' ~ LogNormal(P_mean, P_std), and compared in the encoder features:
      err_perc(x) = mean_features || phi(x0_hat + sigma' eps'; sigma') - phi(x + sigma' eps'; sigma') ||^2,
  phi(y; s) = the hidden features of the reference network F_ref(c_in(s) y; c_noise(s)) returned
  by `net(x_in, c_noise, features=True) -> (out, feats)` (`score.Denoiser.with_features`). For the
  residual MLP these are the last hidden layer (after the final LayerNorm + SiLU, before the
  output projection): the MLP has no decoder, so its whole trunk is the "encoder". For the U-Net
  they are whatever the U-Net returns under the same convention (its encoder/bottleneck features).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdistill import diffusion
from fdistill.objectives.base import Objective, register
from fdistill.objectives import score
from fdistill.denoiser import edm_dsm_loss, sample_chunked
from fdistill.train_state import Optimizer, OptimizerSettings, TrainState, ema_update

METHODS = ("diffusion_dpo", "mapo")
SPACES = ("pixel", "perceptual")


# ----------------------------------------------------------------------------------------------
# Pure losses (per pair)
# ----------------------------------------------------------------------------------------------
def diffusion_dpo(err_w, err_l, ref_err_w, ref_err_l, beta: float):
    """Diffusion-DPO per-pair loss (arXiv 2311.12908, eq. 14, constants of the public code):

        -log sigmoid( -(beta / 2) * [(err_w - ref_err_w) - (err_l - ref_err_l)] ).

    Returns (loss [B], inside [B]); `inside` > 0 means the policy already prefers the winner more
    than the reference does (its mean is Diffusion-DPO's "implicit accuracy").
    """
    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    return -jax.nn.log_sigmoid(inside), inside


def odds_link(u):
    """h(u) = u / (exp(u) - 1) for u >= 0, with h(0) = 1 (MaPO's bounded odds link).

    Written as u exp(-u) / (1 - exp(-u)) (no overflow at large u) and with a first-order series
    below 1e-6 (no 0/0 at u = 0, in the value or the gradient).
    """
    small = u < 1e-6
    safe = jnp.where(small, 1.0, u)
    return jnp.where(small, 1.0 - 0.5 * u, safe * jnp.exp(-safe) / -jnp.expm1(-safe))


def mapo(err_w, err_l, beta: float, snr_value: float = 0.5, margin_scale: float = 1000.0):
    """MaPO per-pair loss (arXiv 2406.06424; mapo-t2i/mapo `utils.py::compute_loss`):

        err_w - beta * log sigmoid( T * [h(s err_w) - h(s err_l)] ),  h(u) = u / (exp(u) - 1).

    Returns (loss [B], margin [B]) with margin = h(s err_w) - h(s err_l) (> 0: winner preferred).
    """
    margin = odds_link(snr_value * err_w) - odds_link(snr_value * err_l)
    return err_w - beta * jax.nn.log_sigmoid(margin_scale * margin), margin


# ----------------------------------------------------------------------------------------------
# Denoising errors
# ----------------------------------------------------------------------------------------------
def pixel_errors(denoiser, params, x, sigma, noise, **kw):
    """lambda(sigma) * mean ||D(x + sigma noise; sigma) - x||^2 per example (EDM eq. 8)."""
    return edm_dsm_loss(denoiser, params, x, sigma, noise, **kw)


def features(denoiser, feat_params, y, sigma, **kw):
    """phi(y; sigma): hidden features of F(c_in y; c_noise) (`net(..., features=True)`), [B, -1]."""
    _, h = denoiser.with_features(feat_params, y, sigma, **kw)
    return h.reshape(h.shape[0], -1)


def perceptual_errors(denoiser, params, feat_params, x, sigma, noise, sigma2, noise2, **kw):
    """Noise-conditioned perceptual error (arXiv 2406.17636; self-perceptual form of 2401.00110):

        mean || phi(x0_hat + sigma2 noise2; sigma2) - phi(x + sigma2 noise2; sigma2) ||^2,
        x0_hat = D_params(x + sigma noise; sigma),  phi = features of the network at `feat_params`.
    """
    x0_hat = denoiser(params, x + diffusion.expand(sigma, x) * noise, sigma, **kw)
    s2 = diffusion.expand(sigma2, x)
    f_hat = features(denoiser, feat_params, x0_hat + s2 * noise2, sigma2, **kw)
    f_true = features(denoiser, feat_params, x + s2 * noise2, sigma2, **kw)
    return jnp.mean((f_hat - f_true) ** 2, axis=-1)


def pair_errors(denoiser, params, feat_params, x_w, x_l, key, p_mean, p_std, space, **kw):
    """(err_w, err_l) with one sigma and one noise draw shared by the two samples of a pair.

    `key` fixes the noise, so calling this with the policy's and the reference's params gives
    both models' errors on the same noised inputs (as Diffusion-DPO requires).
    """
    b = x_w.shape[0]
    k_sigma, k_noise, k_sigma2, k_noise2 = jax.random.split(key, 4)
    sigma = diffusion.sample_lognormal_sigma(k_sigma, (b,), p_mean, p_std)
    noise = jax.random.normal(k_noise, x_w.shape, x_w.dtype)
    x = jnp.concatenate([x_w, x_l])
    sig, eps = jnp.concatenate([sigma, sigma]), jnp.concatenate([noise, noise])
    kw2 = {k: jnp.concatenate([v, v]) for k, v in kw.items()}
    if space == "pixel":
        err = pixel_errors(denoiser, params, x, sig, eps, **kw2)
    else:
        sigma2 = diffusion.sample_lognormal_sigma(k_sigma2, (b,), p_mean, p_std)
        noise2 = jax.random.normal(k_noise2, x_w.shape, x_w.dtype)
        err = perceptual_errors(denoiser, params, feat_params, x, sig, eps, jnp.concatenate([sigma2, sigma2]),
                                jnp.concatenate([noise2, noise2]), **kw2)
    return err[:b], err[b:]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def validate_config(config) -> None:
    """Fails at start-up naming the bad field and the allowed values."""
    if "dpo" not in config:
        raise ValueError("config.dpo is missing; the 'diffusion_po' objective needs a dpo section")
    d = config.dpo
    if d.get("method") not in METHODS:
        raise ValueError(f"config.dpo.method={d.get('method')!r} is not known; allowed: {list(METHODS)}")
    if d.get("space", "pixel") not in SPACES:
        raise ValueError(f"config.dpo.space={d.get('space')!r} is not known; allowed: {list(SPACES)}")
    if not float(d.get("beta", 0.0)) > 0:
        raise ValueError(f"config.dpo.beta must be > 0, got {d.get('beta')}")
    if d.method == "mapo":
        for field in ("snr_value", "margin_scale"):
            if not float(d.get(field, 1.0)) > 0:
                raise ValueError(f"config.dpo.{field} must be > 0, got {d.get(field)}")
    if not d.get("reference") and "teacher" not in d:
        raise ValueError("config.dpo.reference is empty and config.dpo.teacher (a score config to train "
                         "the reference from) is missing; set one of them")


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("FDISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fdistill")),
                        "references")


def config_hash(cfg) -> str:
    import hashlib

    d = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_reference(config) -> str:
    """The reference (teacher) workdir: `config.dpo.reference` when set; otherwise the score run
    described by `config.dpo.teacher`, trained once into `<cache>/<objective>-<config hash>`
    (`config.dpo.reference_cache`, default $FDISTILL_CACHE/references or ~/.cache/fdistill/references)
    and reused by every later run with the same teacher config (so DPO and MaPO runs share it)."""
    d = config.dpo
    if d.get("reference"):
        ref = os.path.abspath(os.path.expanduser(d.reference))
        if not os.path.exists(os.path.join(ref, "config.json")):
            raise FileNotFoundError(f"config.dpo.reference={d.reference!r} is not a finished score run's workdir "
                                    "(no config.json); train one with experiments.run first")
        return ref
    teacher = d.teacher
    root = d.get("reference_cache", "") or default_cache_dir()
    ref = os.path.abspath(os.path.join(os.path.expanduser(root), f"{teacher.objective}-{config_hash(teacher)}"))
    results = os.path.join(ref, "results.json")
    done = False
    if os.path.exists(results):
        with open(results) as f:
            done = json.load(f).get("step") == int(teacher.train.num_steps)
    if not done:
        from fdistill import train  # local import: train imports the objectives package

        print(f"[fdistill] training the reference score model into {ref} (reused by later runs)", flush=True)
        train.train_and_evaluate(teacher, ref)
    return ref


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
@register("diffusion_po")
class DiffusionPreferenceObjective(Objective):
    """Fine-tunes a trained EDM denoiser (the reference) on preference pairs of its own samples.

    config.dpo: method ('diffusion_dpo' | 'mapo'), space ('pixel' | 'perceptual'), beta,
    snr_value, margin_scale (MaPO), reference (workdir of a score run) or teacher (its config).
    config.reward / config.pairs: see `fdistill.data.diffusion_preference`.
    """

    def __init__(self, config):
        super().__init__(config)
        validate_config(config)
        from fdistill.data import diffusion_preference as prefdata

        self.prefdata = prefdata
        self.reference_dir = ensure_reference(config)
        self.denoiser, self.ref_params, self.ref_config = score.load_teacher(self.reference_dir)
        from fdistill import data as data_lib

        self.source = data_lib.build(self.ref_config.data)
        self.shape = tuple(self.source.shape)
        self.num_classes = int(self.ref_config.model.get("num_classes", 0) or 0)
        self.reward = prefdata.build_reward(config.reward, self.source)
        pair_steps = int(config.pairs.get("num_steps", 0) or self.ref_config.eval.num_steps)
        sample_fn = lambda k, n, labels: self.sample(self.ref_params, k, n, pair_steps, labels)
        self.pairs = prefdata.ensure_pairs(config, self.reference_dir, self.ref_config, sample_fn, self.shape,
                                           self.num_classes, self.reward)
        self.tx = Optimizer(OptimizerSettings.from_config(config.train)).tx
        self.p_mean = float(self.ref_config.diffusion.p_mean)
        self.p_std = float(self.ref_config.diffusion.p_std)
        d = config.dpo
        self.method, self.space, self.beta = d.method, d.get("space", "pixel"), float(d.beta)
        self.snr_value, self.margin_scale = float(d.get("snr_value", 0.5)), float(d.get("margin_scale", 1000.0))

    # ----- contract -------------------------------------------------------------------------
    def init(self, key):
        params = jax.tree.map(jnp.array, self.ref_params)
        state = TrainState(step=jnp.zeros((), jnp.int32), rng=key, params=params,
                                 opt_state=self.tx.init(params), ema_params=jax.tree.map(jnp.array, params))
        return state, {"ref": self.ref_params}

    def _kw(self, batch):
        return {"labels": batch["label"]} if self.num_classes and "label" in batch else {}

    def loss(self, params, ref_params, batch, key):
        """Mean per-pair loss and metrics; the reference never receives a gradient."""
        kw = self._kw(batch)
        args = (batch["x_w"], batch["x_l"], key, self.p_mean, self.p_std, self.space)
        err_w, err_l = pair_errors(self.denoiser, params, ref_params, *args, **kw)
        metrics = {"err_w": jnp.mean(err_w), "err_l": jnp.mean(err_l)}
        if self.method == "diffusion_dpo":
            ref_w, ref_l = jax.lax.stop_gradient(pair_errors(self.denoiser, ref_params, ref_params, *args, **kw))
            per_pair, inside = diffusion_dpo(err_w, err_l, ref_w, ref_l, self.beta)
            metrics.update(ref_err_w=jnp.mean(ref_w), ref_err_l=jnp.mean(ref_l),
                           implicit_acc=jnp.mean(inside > 0), inside=jnp.mean(inside))
        else:
            per_pair, margin = mapo(err_w, err_l, self.beta, self.snr_value, self.margin_scale)
            metrics.update(margin=jnp.mean(margin), margin_acc=jnp.mean(margin > 0))
        loss = jnp.mean(per_pair)
        metrics["loss"] = loss
        return loss, metrics

    def train_step(self, state, frozen, batch):
        key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = jax.grad(self.loss, has_aux=True)(state.params, frozen["ref"], batch, key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, self.config.train.get("ema_decay", 0.0))
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    def batch(self, step, process_index=0, process_count=1):
        return self.pairs.batch(step, self.config.train.batch_size, process_index, process_count)

    # ----- evaluation -----------------------------------------------------------------------
    def sample(self, params, key, n, num_steps=None, labels=None):
        """n deterministic EDM samples (the reference's sampler settings unless config.eval overrides)."""
        e, re = self.config.eval, self.ref_config.eval
        return sample_chunked(self.denoiser, params, self.shape, key, n, int(num_steps or e.get("num_steps", re.num_steps)),
                              e.get("sampler", re.get("sampler", "heun")), self.ref_config.diffusion,
                              int(e.get("chunk", 4096)), self.num_classes, labels)

    def evaluate(self, state, frozen, key):
        """Reward, preferred fraction, the data source's sample metrics and MMD to the reference's
        samples (same initial noise for both models), plus the reference's own numbers."""
        e = self.config.eval
        params = state.ema_params if e.get("use_ema", True) else state.params
        n = int(e.num_samples)
        t0 = time.perf_counter()
        x = self.sample(params, key, n)
        elapsed = time.perf_counter() - t0
        cache = (n, np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                else key).tobytes())
        if getattr(self, "_ref_cache", None) != cache:
            self._ref_samples, self._ref_cache = self.sample(frozen["ref"], key, n), cache
        x_ref = self._ref_samples
        metrics = {f"sample/{k}": v for k, v in self.source.evaluate_samples(x).items()}
        metrics.update({f"reference/{k}": v for k, v in self.source.evaluate_samples(x_ref).items()})
        gmm = getattr(self.source, "gmm", None)
        metrics.update(self.prefdata.reward_metrics(self.reward, x, "", gmm))
        metrics.update(self.prefdata.reward_metrics(self.reward, x_ref, "reference/", gmm))
        metrics["mmd_to_reference"] = self.prefdata.mmd_to_reference(x, x_ref)
        metrics["reward_gain"] = metrics["reward_mean"] - metrics["reference/reward_mean"]
        metrics["samples_per_sec"] = n / max(elapsed, 1e-9)
        self._last_samples = x
        return metrics

    def plot(self, state, frozen, plot_dir, step):
        x = getattr(self, "_last_samples", None)
        if x is None:
            x = self.sample(state.ema_params, jax.random.PRNGKey(0), min(int(self.config.eval.num_samples), 4096))
        title = f"{self.method} ({self.space}), beta={self.beta:g}, step {step}"
        paths = [self.source.plot_samples(x, os.path.join(plot_dir, f"samples_{step:07d}.png"), title)]
        x_ref = getattr(self, "_ref_samples", None)
        if x_ref is not None:
            paths.append(self.source.plot_samples(x_ref, os.path.join(plot_dir, "reference_samples.png"),
                                                  "reference (before preference optimisation)"))
        return paths
