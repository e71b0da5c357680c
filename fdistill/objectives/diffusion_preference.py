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

Losses: any loss of the preference registry (`fdistill.objectives.preference`, `config.dpo.method`),
fed the implicit log-likelihoods pi = -err / 2 of the policy and the reference with lengths 1
(the Gaussian log-likelihood of the denoising step up to constants; Wallace et al., arXiv
2311.12908, eqs. 9-14):

* `diffusion_dpo` (= `dpo`; arXiv 2311.12908, eq. 14):
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
* the language losses (`ipo`, `cdpo`, `hinge`, `simpo`, `rpo`, `orpo`, ...) on the same
  log-likelihoods, e.g. IPO: (h - 1/(2 beta))^2 with h the DPO margin of pi = -err/2.
* `perceptual` errors (`config.dpo.space='perceptual'`; Gambashidze et al., arXiv 2406.17636, "noise-conditioned perception"): the
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

The reference (and initial policy) is the finished score run named by `config.dpo.reference`
(`fdistill.runs`; `python -m experiments.prepare` trains it); its data, model and diffusion
sections must equal the config's. Noise levels and noise draws are made once per batch, so
gradient accumulation (`config.train.grad_accum_steps`) sees exactly the full batch's draws.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fdistill import data as data_lib
from fdistill import diffusion, runs
from fdistill import train_state as ts
from fdistill.configs import ConfigError
from fdistill.data import diffusion_preference as prefdata
from fdistill.denoiser import build_denoiser, edm_dsm_loss, label_kwargs, sample_chunked
from fdistill.objectives import preference as prefloss
from fdistill.objectives.base import Objective, register

SPACES = ("pixel", "perceptual")


# ----------------------------------------------------------------------------------------------
# Denoising errors
# ----------------------------------------------------------------------------------------------
def features(denoiser, feat_params, y, sigma, **kw):
    """phi(y; sigma): hidden features of F(c_in y; c_noise) (`net(..., features=True)`), [B, -1]."""
    _, h = denoiser.with_features(feat_params, y, sigma, **kw)
    return h.reshape(h.shape[0], -1)


def perceptual_errors(denoiser, params, feat_params, x, sigma, noise, sigma2, noise2, rngs=None, **kw):
    """Noise-conditioned perceptual error (arXiv 2406.17636; self-perceptual form of 2401.00110):

        mean || phi(x0_hat + sigma2 noise2; sigma2) - phi(x + sigma2 noise2; sigma2) ||^2,
        x0_hat = D_params(x + sigma noise; sigma),  phi = features of the network at `feat_params`.
    """
    x0_hat = denoiser(params, x + diffusion.expand(sigma, x) * noise, sigma, rngs=rngs, **kw)
    s2 = diffusion.expand(sigma2, x)
    f_hat = features(denoiser, feat_params, x0_hat + s2 * noise2, sigma2, **kw)
    f_true = features(denoiser, feat_params, x + s2 * noise2, sigma2, **kw)
    return jnp.mean((f_hat - f_true) ** 2, axis=-1)


def pair_noise(key, x_w, p_mean: float, p_std: float) -> dict:
    """One noise level and one noise draw per pair, shared by its two samples (`sigma`, `noise`),
    and the second draw of the perceptual errors (`sigma2`, `noise2`), for the whole batch."""
    b = x_w.shape[0]
    k_sigma, k_noise, k_sigma2, k_noise2 = jax.random.split(key, 4)
    return {"sigma": diffusion.sample_lognormal_sigma(k_sigma, (b,), p_mean, p_std),
            "noise": jax.random.normal(k_noise, x_w.shape, x_w.dtype),
            "sigma2": diffusion.sample_lognormal_sigma(k_sigma2, (b,), p_mean, p_std),
            "noise2": jax.random.normal(k_noise2, x_w.shape, x_w.dtype)}


def pair_errors(denoiser, params, feat_params, x_w, x_l, noise: dict, space: str, rngs=None, **kw):
    """(err_w, err_l): pixel errors lambda(sigma) mean ||D(x + sigma eps; sigma) - x||^2 (EDM eq. 8)
    or perceptual errors, with the draws of `pair_noise` shared by the two samples of a pair.

    Called with the policy's and the reference's params on the same `noise`, it gives both models'
    errors on the same noised inputs (as Diffusion-DPO requires). `rngs` (dropout) reach the
    network at `params` only.
    """
    b = x_w.shape[0]
    twice = lambda v: jnp.concatenate([v, v])
    x = jnp.concatenate([x_w, x_l])
    kw2 = {k: twice(v) for k, v in kw.items()}
    if space == "pixel":
        err = edm_dsm_loss(denoiser, params, x, twice(noise["sigma"]), twice(noise["noise"]), rngs=rngs, **kw2)
    else:
        err = perceptual_errors(denoiser, params, feat_params, x, twice(noise["sigma"]), twice(noise["noise"]),
                                twice(noise["sigma2"]), twice(noise["noise2"]), rngs=rngs, **kw2)
    return err[:b], err[b:]


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
def validate_config(config) -> None:
    """Fails at start-up naming the bad field and the allowed values."""
    d = config.dpo
    prefloss.check_params(d.method, d.beta, prefloss.params_from(d), section="config.dpo", loss_field="method")
    if d.space not in SPACES:
        raise ConfigError(f"config.dpo.space={d.space!r} is not known; allowed: {list(SPACES)}")


@register("diffusion_po")
class DiffusionPreferenceObjective(Objective):
    """Fine-tunes a trained EDM denoiser (the reference) on preference pairs of its own samples.

    config.dpo: method (a preference loss), space ('pixel' | 'perceptual'), beta, the loss
    parameters, reference (workdir of a finished score run).
    config.reward / config.pairs: see `fdistill.data.diffusion_preference`.
    """

    def __init__(self, config):
        super().__init__(config)
        validate_config(config)
        d = config.dpo
        self.method, self.space, self.beta = d.method, d.space, float(d.beta)
        self.loss_params = prefloss.params_from(d)
        self.reference_free = prefloss.is_reference_free(d.method)
        run = runs.open_dependency(config, "dpo.reference")
        self.reference_dir, self.ref_config = run.workdir, run.config
        self.source = data_lib.build(config.data)
        self.shape = tuple(self.source.shape)
        self.denoiser = build_denoiser(run.config, self.shape)
        self.ref_params = runs.stored_params(run)  # read onto its shardings by the loop
        host_ref = functools.cache(self.ref_params.numpy)  # read to host only if the pairs are sampled here
        self.num_classes = config.model.num_classes if self.source.num_classes else 0
        self.dropout = config.model.dropout > 0
        self.reward = prefdata.build_reward(config.reward, self.source)
        self.alignment = prefdata.AlignmentEvaluator(self.source, self.reward)
        pair_steps = config.pairs.num_steps or self.ref_config.eval.num_steps
        sample_fn = lambda k, n, labels: self.sample(host_ref(), k, n, pair_steps, labels)
        self.pairs = prefdata.ensure_pairs(config, self.reference_dir, self.ref_config, sample_fn, self.shape,
                                           self.num_classes, self.reward)
        self.optimizer = ts.Optimizer(ts.OptimizerSettings.from_config(config.train))
        self.num_micro = ts.check_grad_accum(config.train.grad_accum_steps, config.train.batch_size)

    # ----- contract -------------------------------------------------------------------------
    def frozen(self):
        return {"ref": self.ref_params}

    def init_state(self, key, frozen):
        return ts.create_state(jax.tree.map(jnp.array, frozen["ref"]), self.optimizer, key)

    def loss(self, params, ref_params, inputs, rngs=None):
        """Mean per-pair loss and metrics on `inputs` (the batch and its `pair_noise` draws); the
        reference never receives a gradient."""
        kw = label_kwargs(self.num_classes, inputs.get("label"))
        errors = lambda p, r: pair_errors(self.denoiser, p, ref_params, inputs["x_w"], inputs["x_l"], inputs,
                                          self.space, r, **kw)
        err_w, err_l = errors(params, rngs)
        metrics = {"err_w": jnp.mean(err_w), "err_l": jnp.mean(err_l)}
        ref_w = ref_l = None
        if not self.reference_free:
            ref_err_w, ref_err_l = jax.lax.stop_gradient(errors(ref_params, None))
            ref_w, ref_l = -0.5 * ref_err_w, -0.5 * ref_err_l
            metrics.update(ref_err_w=jnp.mean(ref_err_w), ref_err_l=jnp.mean(ref_err_l))
        ones = jnp.ones_like(err_w)
        per_pair, loss_metrics = prefloss.preference_loss(self.method, -0.5 * err_w, -0.5 * err_l, ref_w, ref_l,
                                                          ones, ones, beta=self.beta, **self.loss_params)
        loss = jnp.mean(per_pair)
        return loss, {**metrics, **loss_metrics, "loss": loss}

    def train_step(self, state, frozen, batch):
        key = ts.step_key(state)
        d = self.config.diffusion
        inputs = {**batch, **pair_noise(key, batch["x_w"], d.p_mean, d.p_std)}
        rngs = ts.dropout_rngs(key) if self.dropout else None
        loss_fn = lambda p, x: self.loss(p, frozen["ref"], x, rngs)
        (_, metrics), grads = ts.value_and_grad(loss_fn, state.params, inputs, self.num_micro, has_aux=True)
        state, opt_metrics = ts.apply_gradients(state, grads, self.optimizer)
        return state.replace(step=state.step + 1), {**metrics, **opt_metrics}

    def batch(self, step, process_index=0, process_count=1):
        return self.pairs.batch(step, self.config.train.batch_size, process_index, process_count)

    # ----- evaluation -----------------------------------------------------------------------
    def sample(self, params, key, n, num_steps=None, labels=None):
        """n deterministic EDM samples (config.eval's sampler; `num_steps` overrides its steps)."""
        e = self.config.eval
        return sample_chunked(self.denoiser, params, self.shape, key, n, num_steps or e.num_steps, e.sampler,
                              self.config.diffusion, e.chunk, self.num_classes, labels)

    def evaluate(self, state, frozen, key):
        """Reward, preferred fraction, the data source's sample metrics and MMD to the reference's
        samples (same initial noise for both models), plus the reference's own numbers."""
        params = ts.eval_params(state, use_ema=self.config.eval.use_ema)
        return self.alignment.evaluate(lambda m: self.sample(params, key, m), lambda m: self.sample(frozen["ref"], key, m),
                                       key, int(self.config.eval.num_samples))

    def plot(self, state, frozen, plot_dir, step):
        params = ts.eval_params(state, use_ema=self.config.eval.use_ema)
        return self.alignment.plot(plot_dir, step, f"{self.method} ({self.space}), beta={self.beta:g}, step {step}",
                                   "reference (before preference optimisation)",
                                   lambda m: self.sample(params, jax.random.PRNGKey(0), m),
                                   int(self.config.eval.num_samples))
