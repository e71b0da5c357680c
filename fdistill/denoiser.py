"""EDM denoisers around Flax networks: D(x; sigma), the DSM loss, and chunked deterministic sampling.

Shared by every diffusion objective (score estimation, distillation, diffusion preference
optimisation) and by the teachers and references they load.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import diffusion, flow, models, sharding
from fdistill.configs import ConfigError


class Denoiser:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around a Flax module `net` (EDM eq. 7).

    Keyword arguments reach the network: `labels` for class-conditional models; `rngs=` (Flax
    rngs with a 'dropout' key) switches the network to training mode (dropout active).
    """

    def __init__(self, net, sigma_data: float):
        self.net = net
        self.sigma_data = float(sigma_data)

    def init(self, key, x_example: jax.Array, **kw):
        sigma = jnp.ones(x_example.shape[:1])
        c_noise = jnp.log(sigma) / 4
        return self.net.init(key, x_example, c_noise, **kw)["params"]

    def apply_net(self, params, x_in, c_noise, rngs=None, **kw):
        """F(x_in; c_noise), the network inside the preconditioning."""
        if rngs is not None:
            return self.net.apply({"params": params}, x_in, c_noise, train=True, rngs=rngs, **kw)
        return self.net.apply({"params": params}, x_in, c_noise, **kw)

    def __call__(self, params, x: jax.Array, sigma: jax.Array, rngs=None, **kw) -> jax.Array:
        net = lambda x_in, c_noise: self.apply_net(params, x_in, c_noise, rngs, **kw)
        return diffusion.precondition(net, x, sigma, self.sigma_data)

    def with_features(self, params, x: jax.Array, sigma: jax.Array, rngs=None, **kw):
        """(D(x; sigma), hidden features of F) for heads that read the network's features."""
        feats = {}

        def net(x_in, c_noise):
            out, feats["h"] = self.apply_net(params, x_in, c_noise, rngs, features=True, **kw)
            return out

        d = diffusion.precondition(net, x, sigma, self.sigma_data)
        return d, feats["h"]

    def raw_output(self, params, x: jax.Array, sigma: jax.Array, **kw) -> jax.Array:
        """F(c_in x; c_noise), the network's output inside EDM's preconditioning (consistency models
        wrap it in their own c_skip, c_out)."""
        _, _, c_in, c_noise = diffusion.preconditioning(sigma, self.sigma_data)
        return self.apply_net(params, diffusion.expand(c_in, x) * x, jnp.broadcast_to(c_noise, x.shape[:1]),
                              **kw).astype(x.dtype)

    def velocity(self, params, x_t: jax.Array, t: jax.Array, rngs=None, **kw) -> jax.Array:
        """The flow-matching velocity v(x_t; t) = (x_t - D(x_t / (1 - t); t / (1 - t))) / t of this
        denoiser (`fdistill.flow`; 0 < t < 1)."""
        sigma = flow.t_to_sigma(t)
        x = x_t / diffusion.expand(1.0 - t, x_t)
        return flow.velocity_from_denoiser(self(params, x, sigma, rngs=rngs, **kw), x_t, t)


class VelocityDenoiser(Denoiser):
    """A velocity network F(x_t, t) of flow matching (`config.model.parametrisation='velocity'`),
    seen as an EDM denoiser through the exact conversion of `fdistill.flow`:

        D(x; sigma) = x_t - t F(x_t, t),   t = sigma / (1 + sigma),   x_t = x / (1 + sigma).

    F reads x_t unscaled and t as its noise conditioning; a zero output layer starts at v = 0.
    """

    def init(self, key, x_example: jax.Array, **kw):
        return self.net.init(key, x_example, jnp.full(x_example.shape[:1], 0.5), **kw)["params"]

    def velocity(self, params, x_t: jax.Array, t: jax.Array, rngs=None, **kw) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
        return self.apply_net(params, x_t, t, rngs, **kw).astype(x_t.dtype)

    def _inputs(self, x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        t = flow.sigma_to_t(sigma)
        return x / diffusion.expand(1.0 + sigma, x), t

    def __call__(self, params, x: jax.Array, sigma: jax.Array, rngs=None, **kw) -> jax.Array:
        x_t, t = self._inputs(x, sigma)
        return flow.denoiser_from_velocity(self.velocity(params, x_t, t, rngs, **kw), x_t, t)

    def raw_output(self, params, x: jax.Array, sigma: jax.Array, **kw) -> jax.Array:
        """The F with D = c_skip x + c_out F (EDM Table 1) that this network's D implies."""
        c_skip, c_out, _, _ = diffusion.preconditioning(sigma, self.sigma_data)
        e = lambda c: diffusion.expand(c, x)  # noqa: E731
        return (self(params, x, sigma, **kw) - e(c_skip) * x) / e(c_out)

    def with_features(self, params, x: jax.Array, sigma: jax.Array, rngs=None, **kw):
        x_t, t = self._inputs(x, sigma)
        v, h = self.apply_net(params, x_t, t, rngs, features=True, **kw)
        return flow.denoiser_from_velocity(v.astype(x.dtype), x_t, t), h


PARAMETRISATIONS = {"edm": Denoiser, "velocity": VelocityDenoiser}


def build_denoiser(config, shape) -> Denoiser:
    """The denoiser of `config.model` for data of per-example `shape`: EDM-preconditioned
    (`model.parametrisation='edm'`) or a flow-matching velocity network (`'velocity'`)."""
    kind = config.model.parametrisation
    if kind not in PARAMETRISATIONS:
        raise ConfigError(f"config.model.parametrisation={kind!r} is not known; allowed: {list(PARAMETRISATIONS)}")
    net = models.build(config.model, shape, config.train.compute_dtype)
    return PARAMETRISATIONS[kind](net, config.diffusion.sigma_data)


def edm_dsm_loss(denoiser: Denoiser, params, x0, sigma, noise, **kw) -> jax.Array:
    """Per-example EDM loss lambda(sigma) * mean_features ||D(x0 + sigma n; sigma) - x0||^2 (eq. 8)."""
    xt = x0 + diffusion.expand(sigma, x0) * noise
    d = denoiser(params, xt, sigma, **kw)
    err = jnp.mean((d - x0) ** 2, axis=tuple(range(1, x0.ndim)))
    return diffusion.loss_weight(sigma, denoiser.sigma_data) * err


def label_kwargs(num_classes: int, labels) -> dict:
    """Class labels reach the network only for class-conditional models."""
    return {"labels": labels} if num_classes and labels is not None else {}


_SAMPLE_FNS: dict = {}


def sample_chunked(denoiser: Denoiser, params, shape, key, n: int, num_steps: int, sampler: str, diffusion_config,
                   chunk: int, num_classes: int = 0, labels=None, space: str = "sigma") -> np.ndarray:
    """n deterministic samples generated in jitted chunks of `chunk` (one compile per chunk size):
    `space='sigma'` integrates the EDM ODE on the Karras levels (`diffusion.sample`), `space='t'`
    the flow ODE on N uniform steps from t = 1 (`flow.sample`; velocity networks). Heun or Euler.
    Labels are drawn uniformly when None (conditional models)."""
    if space not in ("sigma", "t"):
        raise ValueError(f"space={space!r} must be 'sigma' or 't'")
    cache_key = (id(denoiser), num_steps, sampler, chunk, tuple(shape), num_classes, space)
    if cache_key not in _SAMPLE_FNS:
        dc = diffusion_config

        @jax.jit
        def fn(params, noise, labels):
            kw = label_kwargs(num_classes, labels)
            if space == "t":
                return flow.sample(lambda x, t: denoiser.velocity(params, x, t, **kw), noise,
                                   flow.uniform_times(num_steps), sampler)
            return diffusion.sample(lambda x, s: denoiser(params, x, s, **kw), noise, num_steps, sampler=sampler,
                                    sigma_min=dc.sigma_min, sigma_max=dc.sigma_max, rho=dc.rho)

        _SAMPLE_FNS[cache_key] = fn
    return sample_in_chunks(_SAMPLE_FNS[cache_key], params, key, n, chunk, shape, num_classes, labels)[0]


def sample_in_chunks(fn, params, key, n: int, chunk: int, shape, num_classes: int = 0, labels=None):
    """(n outputs of a jitted sampler `fn(params, noise [chunk, *shape], labels [chunk])`, the n labels
    used), run over ceil(n / chunk) chunks of a fixed size (one compile). Chunk i draws its noise and,
    when `labels` is None, uniform labels in [0, num_classes) from fold_in(key, i); given labels are
    cycled to fill the last chunk."""
    out, labs = [], []
    for i, start in enumerate(range(0, n, chunk)):
        k_noise, k_label = jax.random.split(jax.random.fold_in(key, i))
        noise = jax.random.normal(k_noise, (chunk,) + tuple(shape))
        if labels is None:
            lab = jax.random.randint(k_label, (chunk,), 0, max(num_classes, 1))
        else:
            lab = jnp.asarray(np.resize(np.asarray(labels)[start:start + chunk], chunk))
        out.append(sharding.to_host(fn(params, noise, lab)))  # gathered if the mesh splits it over processes
        labs.append(np.asarray(lab))
    return np.concatenate(out)[:n], np.concatenate(labs)[:n]


def denoiser_errors(denoiser: Denoiser, params, source, key, sigmas=(0.02, 0.2, 2.0, 20.0), n=4096
                    ) -> dict[str, Any]:
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
