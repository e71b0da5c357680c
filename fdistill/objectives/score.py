"""EDM denoising score matching (Karras et al. 2022, arXiv 2206.00364, eq. 2 and eq. 8).

    L(theta) = E_{sigma ~ LogNormal(P_mean, P_std), x0 ~ data, n ~ N(0, sigma^2 I)}
               [ lambda(sigma) || D_theta(x0 + n; sigma) - x0 ||^2 ],
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

with D_theta the EDM-preconditioned network. The minimiser is E[x0 | x_sigma], so the score is
(D(x; sigma) - x) / sigma^2. Parameters keep an exponential moving average used for sampling.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdistill import diffusion, models
from fdistill import data as data_lib
from fdistill.objectives.base import Objective, register
from fdistill.objectives.common import accumulated_value_and_grad


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    rng: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Adam(W) with optional warm-up and global-norm clipping from `config.train`."""
    lr = train_config.learning_rate
    warmup = int(train_config.get("warmup_steps", 0))
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    parts = []
    clip = train_config.get("grad_clip", 0.0)
    if clip:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_config.get("weight_decay", 0.0)))
    return optax.chain(*parts)


class Denoiser:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around a Flax module `net` (EDM eq. 7)."""

    def __init__(self, net, sigma_data: float):
        self.net = net
        self.sigma_data = float(sigma_data)

    def init(self, key, x_example: jax.Array, **kw):
        sigma = jnp.ones(x_example.shape[:1])
        c_noise = jnp.log(sigma) / 4
        return self.net.init(key, x_example, c_noise, **kw)["params"]

    def __call__(self, params, x: jax.Array, sigma: jax.Array, **kw) -> jax.Array:
        net = lambda x_in, c_noise: self.net.apply({"params": params}, x_in, c_noise, **kw)
        return diffusion.precondition(net, x, sigma, self.sigma_data)

    def with_features(self, params, x: jax.Array, sigma: jax.Array, **kw):
        """(D(x; sigma), hidden features of F) for heads that read the network's features."""
        feats = {}

        def net(x_in, c_noise):
            out, feats["h"] = self.net.apply({"params": params}, x_in, c_noise, features=True, **kw)
            return out

        d = diffusion.precondition(net, x, sigma, self.sigma_data)
        return d, feats["h"]


def edm_dsm_loss(denoiser: Denoiser, params, x0, sigma, noise, **kw) -> jax.Array:
    """Per-example EDM loss lambda(sigma) * mean_features ||D(x0 + sigma n; sigma) - x0||^2 (eq. 8)."""
    xt = x0 + diffusion.expand(sigma, x0) * noise
    d = denoiser(params, xt, sigma, **kw)
    err = jnp.mean((d - x0) ** 2, axis=tuple(range(1, x0.ndim)))
    return diffusion.loss_weight(sigma, denoiser.sigma_data) * err


def grad_accum_steps(config) -> int:
    """`config.train.grad_accum_steps` (default 1), checked against the global batch size."""
    k = int(config.train.get("grad_accum_steps", 1))
    if k < 1 or config.train.batch_size % k:
        raise ValueError(f"config.train.grad_accum_steps={k} must be >= 1 and divide "
                         f"config.train.batch_size={config.train.batch_size}")
    return k


def ema_update(ema, params, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def build_denoiser(config, shape) -> Denoiser:
    net = models.build(config.model, shape, config.train.get("compute_dtype", "float32"))
    return Denoiser(net, config.diffusion.sigma_data)


def label_kwargs(config, batch) -> dict:
    """Class labels are passed to the network only for class-conditional models."""
    if config.model.get("num_classes", 0) and "label" in batch:
        return {"labels": batch["label"]}
    return {}


@register("score")
class ScoreObjective(Objective):
    """Trains an EDM denoiser on `config.data` with `config.model`; evaluates Heun samples."""

    def __init__(self, config):
        super().__init__(config)
        self.source = data_lib.build(config.data)
        self.denoiser = build_denoiser(config, self.source.shape)
        self.tx = make_optimizer(config.train)
        d = config.diffusion
        if config.eval.get("sampler", "heun") not in diffusion.SAMPLERS:
            raise ValueError(
                f"config.eval.sampler={config.eval.sampler!r} is not known; allowed: {list(diffusion.SAMPLERS)}"
            )
        self.p_mean, self.p_std = d.p_mean, d.p_std
        self.grad_accum_steps = grad_accum_steps(config)

    # ----- contract -------------------------------------------------------------------------
    def init(self, key):
        k_init, k_rng = jax.random.split(key)
        x = jnp.zeros((1,) + tuple(self.source.shape), jnp.float32)
        kw = {"labels": jnp.zeros((1,), jnp.int32)} if self.config.model.get("num_classes", 0) else {}
        params = self.denoiser.init(k_init, x, **kw)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            rng=k_rng,
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params,
        )
        return state, {}

    def noised_inputs(self, batch, key) -> dict:
        """Per-example (x0, sigma, noise, labels) for the whole batch, drawn once so that gradient
        accumulation over micro-batches sees exactly the draws of the full batch."""
        x0 = batch["x"]
        k_sigma, k_noise = jax.random.split(key)
        inputs = {
            "x0": x0,
            "sigma": diffusion.sample_lognormal_sigma(k_sigma, x0.shape[:1], self.p_mean, self.p_std),
            "noise": jax.random.normal(k_noise, x0.shape, x0.dtype),
        }
        inputs.update(label_kwargs(self.config, batch))
        return inputs

    def loss(self, params, inputs) -> jax.Array:
        kw = {"labels": inputs["labels"]} if "labels" in inputs else {}
        return jnp.mean(edm_dsm_loss(self.denoiser, params, inputs["x0"], inputs["sigma"], inputs["noise"], **kw))

    def train_step(self, state, frozen, batch):
        key = jax.random.fold_in(state.rng, state.step)
        inputs = self.noised_inputs(batch, key)
        loss, grads = accumulated_value_and_grad(self.loss, state.params, inputs, self.grad_accum_steps)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, self.config.train.ema_decay)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    def batch(self, step, process_index=0, process_count=1):
        return self.source.batch(step, self.config.train.batch_size, process_index, process_count)

    # ----- evaluation -----------------------------------------------------------------------
    def sample(self, params, key, n: int, num_steps: int | None = None, labels=None) -> np.ndarray:
        """n Heun (or Euler) samples from the EMA denoiser, generated in jitted chunks."""
        e = self.config.eval
        num_steps = num_steps or e.num_steps
        return generate(self.denoiser, params, self.source.shape, key, n, num_steps, e.get("sampler", "heun"),
                        self.config.diffusion, e.get("chunk", 4096), self.source.num_classes, labels)

    def evaluate(self, state, frozen, key):
        e = self.config.eval
        params = state.ema_params
        self.sample(params, key, min(e.num_samples, 256))  # compile outside the timed region
        t0 = time.perf_counter()
        x = self.sample(params, key, e.num_samples)
        elapsed = time.perf_counter() - t0
        metrics = dict(self.source.evaluate_samples(x))
        metrics["nfe"] = float(diffusion.nfe(e.num_steps, e.get("sampler", "heun")))
        metrics["samples_per_sec"] = e.num_samples / elapsed
        if hasattr(self.source, "gmm"):
            metrics.update(denoiser_errors(self.denoiser, params, self.source, key))
        self._last_samples = x
        return metrics

    def plot(self, state, frozen, plot_dir, step):
        x = getattr(self, "_last_samples", None)
        if x is None:
            x = self.sample(state.ema_params, jax.random.key(0), min(self.config.eval.num_samples, 4096))
        path = os.path.join(plot_dir, f"samples_{step:07d}.png")
        return [self.source.plot_samples(x, path, f"{self.config.eval.num_steps}-step Heun samples, step {step}")]


_SAMPLE_FNS: dict = {}


def generate(denoiser, params, shape, key, n, num_steps, sampler, diffusion_config, chunk, num_classes=0, labels=None):
    """Deterministic EDM sampling of n examples in chunks (one compiled function per chunk size)."""
    cache_key = (id(denoiser), num_steps, sampler, chunk, tuple(shape))
    if cache_key not in _SAMPLE_FNS:
        dc = diffusion_config

        @jax.jit
        def fn(params, noise, labels):
            kw = {"labels": labels} if num_classes else {}
            return diffusion.sample(lambda x, s: denoiser(params, x, s, **kw), noise, num_steps, sampler=sampler,
                                    sigma_min=dc.sigma_min, sigma_max=dc.sigma_max, rho=dc.rho)

        _SAMPLE_FNS[cache_key] = fn
    fn = _SAMPLE_FNS[cache_key]
    out = []
    for i, start in enumerate(range(0, n, chunk)):
        k_noise, k_label = jax.random.split(jax.random.fold_in(key, i))
        noise = jax.random.normal(k_noise, (chunk,) + tuple(shape))
        if labels is None:
            lab = jax.random.randint(k_label, (chunk,), 0, max(num_classes, 1))
        else:
            lab = jnp.asarray(np.resize(np.asarray(labels)[start:start + chunk], chunk))
        out.append(np.asarray(fn(params, noise, lab)))
    return np.concatenate(out)[:n]


def denoiser_errors(denoiser, params, source, key, sigmas=(0.02, 0.2, 2.0, 20.0), n=4096) -> dict[str, float]:
    """Excess denoising error relative to the Bayes error, at fixed noise levels:

        denoiser_rel_mse/sigma_s = E||D(x_s; s) - D*(x_s; s)||^2 / E||x_0 - D*(x_s; s)||^2

    with D* the exact GMM denoiser (the minimum-MSE estimate). 0 is perfect; 1 means the network
    doubles the irreducible error. (Normalising by ||D*||^2 instead is ill-posed at large sigma,
    where D* tends to the data mean, which can be ~0.)
    """
    x0 = jnp.asarray(source.reference(n, seed=777))
    out = {}
    for i, s in enumerate(sigmas):
        xt = x0 + s * jax.random.normal(jax.random.fold_in(key, i), x0.shape)
        sig = jnp.full((n,), s)
        d = denoiser(params, xt, sig)
        d_star = source.gmm.denoise(xt, sig)
        out[f"denoiser_rel_mse/sigma_{s:g}"] = float(jnp.sum((d - d_star) ** 2) / jnp.sum((x0 - d_star) ** 2))
    return out


def load_teacher(workdir: str):
    """(Denoiser, EMA params, config) of a finished score run in `workdir` (via its config.json)."""
    from fdistill import checkpoint

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher workdir {workdir!r} has no config.json; train it with experiments.run first")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.objective != "score":
        raise ValueError(f"teacher workdir {workdir!r} holds a {config.objective!r} run, expected a 'score' run")
    source = data_lib.build(config.data)
    denoiser = build_denoiser(config, source.shape)
    tree = checkpoint.restore_tree(workdir)
    params = jax.tree.map(jnp.asarray, tree["ema_params"])
    return denoiser, params, config
