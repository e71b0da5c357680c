"""A small U-Net for the EDM preconditioning F(c_in x; c_noise) (Karras et al. 2022, arXiv 2206.00364,
eq. 7; architecture after DDPM++ / ADM, Song et al. arXiv 2011.13456 and Dhariwal & Nichol
arXiv 2105.05233, scaled down).

    x_in [B, H, W, C] -> conv -> encoder (per level: `num_res_blocks` residual blocks, then a
    stride-2 downsample except at the last level) -> middle (res block, optional self-attention,
    res block) = the bottleneck features -> decoder (per level: `num_res_blocks + 1` residual blocks
    on skip-concatenated activations, then a nearest-neighbour upsample) -> GroupNorm, SiLU,
    zero-initialised conv -> out [B, H, W, C].

Residual blocks: GroupNorm, SiLU, 3x3 conv, adaptive scale/shift from the noise (+ class)
embedding (ADM's `adaptive_scale`), GroupNorm, SiLU, dropout, zero-initialised 3x3 conv;
the sum with the (1x1-projected) input is scaled by 1/sqrt(2) (EDM `skip_scale`). The noise level
enters through random Fourier features of c_noise (EDM's 'fourier' embedding, reused from
`fdistill.models.mlp`), followed by a 2-layer MLP; a class label adds a learned embedding.

Channel widths come from the config: level i has `channels * channel_mult[i]` channels; the height
and width must be divisible by 2^(len(channel_mult) - 1). Parameters stay float32; activations use
`dtype` (e.g. bfloat16) and the output is float32. Because the final conv is zero-initialised, a
freshly built network gives D(x; sigma) = c_skip(sigma) x exactly.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill.configs import ConfigError
from fdistill.models.mlp import FourierEmbedding

SKIP_SCALE = float(np.sqrt(0.5))


def _groups(channels: int) -> int:
    """GroupNorm groups: min(32, channels // 4) (EDM uses 32 groups of >= 4 channels)."""
    return max(1, min(32, channels // 4))


class ResBlock(nn.Module):
    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        c_in = x.shape[-1]
        h = nn.silu(nn.GroupNorm(_groups(c_in), dtype=self.dtype, epsilon=1e-5)(x))
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h)
        scale_shift = nn.Dense(2 * self.out_channels, dtype=self.dtype)(emb)[:, None, None, :]
        scale, shift = jnp.split(scale_shift, 2, axis=-1)
        h = nn.GroupNorm(_groups(self.out_channels), dtype=self.dtype, epsilon=1e-5)(h)
        h = nn.silu(h * (1.0 + scale) + shift)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
        skip = x if c_in == self.out_channels else nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)
        return (h + skip) * SKIP_SCALE


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (residual, zero-initialised projection)."""

    num_heads: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ConfigError(f"config.model.num_heads={self.num_heads} must divide the bottleneck width {c}")
        h = nn.GroupNorm(_groups(c), dtype=self.dtype, epsilon=1e-5)(x).reshape(b, hgt * wid, c)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, out_kernel_init=nn.initializers.zeros
        )(h, h)
        return (x + h.reshape(b, hgt, wid, c)) * SKIP_SCALE


class UNet(nn.Module):
    """F(x_in, c_noise[, labels]) -> same shape as x_in; `features=True` also returns the bottleneck
    activations [B, H / 2^(L-1), W / 2^(L-1), channels * channel_mult[-1]] (float32).

    `labels` (int [B]) are used when `num_classes > 0` and required then; an unconditional model
    (`num_classes = 0`) ignores them, so samplers may pass labels uniformly.
    """

    out_channels: int
    channels: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 2
    attention: bool = True  # self-attention at the lowest resolution (middle block)
    num_heads: int = 1
    emb_dim: int = 128
    fourier_scale: float = 16.0
    num_classes: int = 0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def _check(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects images [B, H, W, C], got shape {x.shape}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1:3]} is not divisible by 2^(len(config.model.channel_mult) - 1) = {factor}; "
                f"use fewer levels than channel_mult={tuple(self.channel_mult)}"
            )
        for m in self.channel_mult:
            if (self.channels * m) % 4:
                raise ConfigError(
                    f"config.model.channels * channel_mult = {self.channels * m} must be a multiple of 4 (GroupNorm)"
                )

    @nn.compact
    def __call__(self, x_in: jax.Array, c_noise: jax.Array, labels: jax.Array | None = None,
                 features: bool = False, train: bool = False):
        self._check(x_in)
        dt = self.dtype
        emb = FourierEmbedding(self.emb_dim, self.fourier_scale)(c_noise.astype(jnp.float32))
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(f"this UNet is class-conditional (config.model.num_classes={self.num_classes}); "
                                 "pass labels")
            emb = emb + nn.Embed(self.num_classes, self.emb_dim)(labels.astype(jnp.int32))
        emb = nn.silu(nn.Dense(4 * self.emb_dim, dtype=dt)(emb))
        emb = nn.silu(nn.Dense(4 * self.emb_dim, dtype=dt)(emb))

        h = nn.Conv(self.channels, (3, 3), dtype=dt)(x_in.astype(dt))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, self.dropout, dt)(h, emb, train)
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=dt)(h)
                skips.append(h)

        width = self.channels * self.channel_mult[-1]
        h = ResBlock(width, self.dropout, dt)(h, emb, train)
        if self.attention:
            h = SelfAttention(self.num_heads, dt)(h)
        h = ResBlock(width, self.dropout, dt)(h, emb, train)
        feats = h

        for level in reversed(range(len(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.channels * self.channel_mult[level], self.dropout, dt)(h, emb, train)
            if level > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                h = nn.Conv(c, (3, 3), dtype=dt)(h)
        assert not skips
        h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=dt, epsilon=1e-5)(h))
        out = nn.Conv(self.out_channels, (3, 3), dtype=dt, kernel_init=nn.initializers.zeros)(h)
        out = out.astype(jnp.float32)
        return (out, feats.astype(jnp.float32)) if features else out
