"""A noise-conditioned residual MLP for low-dimensional data (the GMM experiments)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill.configs import ConfigError

OUT_INITS = {"zeros": nn.initializers.zeros, "lecun": nn.initializers.lecun_normal()}


class FourierEmbedding(nn.Module):
    """Random Fourier features of the scalar noise conditioning c_noise [B] (EDM's 'fourier'
    embedding). Several conditionings c_noise [B, m] (MeanFlow's (t, t - r)) each get their own
    frequencies and their features are summed: the output is [B, dim] either way."""

    dim: int = 64
    scale: float = 16.0

    @nn.compact
    def __call__(self, c_noise: jax.Array) -> jax.Array:
        cols = c_noise[:, None] if c_noise.ndim == 1 else c_noise
        shape = (self.dim // 2,) if c_noise.ndim == 1 else (cols.shape[1], self.dim // 2)
        freqs = jax.lax.stop_gradient(self.param("freqs", nn.initializers.normal(self.scale), shape))
        angles = 2 * jnp.pi * cols[:, :, None] * freqs.reshape((1, cols.shape[1], self.dim // 2))
        return jnp.sum(jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1), axis=1)


class ResidualBlock(nn.Module):
    width: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype)(h)
        y = nn.Dense(self.width, dtype=self.dtype)(y) + nn.Dense(self.width, dtype=self.dtype)(emb)
        y = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(y))
        y = nn.Dense(self.width, dtype=self.dtype)(y)
        return h + y


class MLPDenoiserNet(nn.Module):
    """F(x_in, c_noise) of the EDM preconditioning: a residual MLP with Fourier noise embedding.

    `features=True` also returns the last hidden layer (used by discriminator heads). With
    `num_classes > 0` a learned class embedding is added to the noise embedding (labels required);
    `train=True` (with a 'dropout' rng) applies dropout inside the residual blocks. The output layer
    starts at zero (`out_init='zeros'`: a fresh EDM denoiser is D = c_skip x) or LeCun-normal
    (`'lecun'`: a fresh one-step generator then spreads its samples instead of starting as a point).
    """

    out_dim: int
    width: int = 128
    depth: int = 3
    emb_dim: int = 64
    num_classes: int = 0
    dropout: float = 0.0
    out_init: str = "zeros"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c_noise: jax.Array, labels: jax.Array | None = None, features: bool = False,
                 train: bool = False):
        emb = FourierEmbedding(self.emb_dim)(c_noise)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(f"this MLP is class-conditional (config.model.num_classes={self.num_classes}); "
                                 "pass labels")
            emb = emb + nn.Embed(self.num_classes, self.emb_dim)(labels.astype(jnp.int32))
        emb = nn.silu(nn.Dense(self.width, dtype=self.dtype)(emb))
        h = nn.Dense(self.width, dtype=self.dtype)(x)
        for _ in range(self.depth):
            h = ResidualBlock(self.width, self.dropout, dtype=self.dtype)(h, emb, train)
        h = nn.silu(nn.LayerNorm(dtype=self.dtype)(h))
        if self.out_init not in OUT_INITS:
            raise ConfigError(f"config.model.out_init={self.out_init!r} is not known; allowed: {list(OUT_INITS)}")
        out = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=OUT_INITS[self.out_init])(h)
        out = out.astype(jnp.float32)
        return (out, h.astype(jnp.float32)) if features else out
