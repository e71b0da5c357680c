"""A noise-conditioned residual MLP for low-dimensional data (the GMM experiments)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class FourierEmbedding(nn.Module):
    """Random Fourier features of the scalar noise conditioning c_noise (EDM's 'fourier' embedding)."""

    dim: int = 64
    scale: float = 16.0

    @nn.compact
    def __call__(self, c_noise: jax.Array) -> jax.Array:
        freqs = self.param("freqs", nn.initializers.normal(self.scale), (self.dim // 2,))
        freqs = jax.lax.stop_gradient(freqs)
        angles = 2 * jnp.pi * c_noise[:, None] * freqs[None, :]
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class ResidualBlock(nn.Module):
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype)(h)
        y = nn.Dense(self.width, dtype=self.dtype)(y) + nn.Dense(self.width, dtype=self.dtype)(emb)
        y = nn.Dense(self.width, dtype=self.dtype)(nn.silu(y))
        return h + y


class MLPDenoiserNet(nn.Module):
    """F(x_in, c_noise) of the EDM preconditioning: a residual MLP with Fourier noise embedding.

    `features=True` also returns the last hidden layer (used by discriminator heads).
    """

    out_dim: int
    width: int = 128
    depth: int = 3
    emb_dim: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c_noise: jax.Array, features: bool = False):
        emb = FourierEmbedding(self.emb_dim)(c_noise)
        emb = nn.silu(nn.Dense(self.width, dtype=self.dtype)(emb))
        h = nn.Dense(self.width, dtype=self.dtype)(x)
        for _ in range(self.depth):
            h = ResidualBlock(self.width, dtype=self.dtype)(h, emb)
        h = nn.silu(nn.LayerNorm(dtype=self.dtype)(h))
        out = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
        out = out.astype(jnp.float32)
        return (out, h.astype(jnp.float32)) if features else out
