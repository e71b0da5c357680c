"""EDM's `SongUNet` in Flax: the DDPM++ and NCSN++ architectures of Song et al. (arXiv 2011.13456) as
re-implemented by Karras et al. in EDM (arXiv 2206.00364, Appendix F.2; NVlabs/edm
`training/networks.py`), parameter for parameter, so that EDM's PyTorch checkpoints load through
`convert_state_dict` and a fresh Flax init has exactly EDM's parameter count.

    F(x_in; c_noise[, labels]):  x_in [B, H, W, C] (NHWC), c_noise = ln(sigma) / 4 (EDM eq. 7).

Mapping network: noise embedding of c_noise ('positional' sin/cos with endpoint for DDPM++,
'fourier' random features with fixed frequencies for NCSN++; halves swapped to [sin, cos]),
+ `map_label(sqrt(num_classes) * one_hot(labels))`, + `map_augment(augment_labels)` (no bias),
then SiLU(map_layer0), SiLU(map_layer1).

Encoder, level by level (resolution H >> level): a 3x3 conv at level 0, a down-sampling UNetBlock
at the others, then `num_blocks` UNetBlocks (self-attention where the resolution is in
`attn_resolutions`). Every output is kept as a skip. NCSN++'s 'residual' encoder adds a fused
conv+down-sampled copy of the previous level ((x + aux) / sqrt 2); the 'skip' encoder adds a 1x1
projection of the down-sampled input image. The encoder's last activation is `features`.

Decoder, from the lowest level up: at the lowest level two UNetBlocks (`in0` with attention,
`in1`), elsewhere an up-sampling UNetBlock; then `num_blocks + 1` UNetBlocks, each on the
concatenation [x, skip] (attention in the last one where the resolution is in
`attn_resolutions`). At level 0 (every level for decoder_type='skip') GroupNorm, SiLU and a 3x3
conv give the output (the 'skip' decoder sums up-sampled outputs of all levels).

Blocks are `edm_layers.UNetBlock` with SongUNet's settings (EDM `adaptive_scale=False`, skip
scale sqrt(1/2), one attention head, GroupNorm eps 1e-6, 1x1 skip projections when resampling);
resampling uses the normalised outer product of `resample_filter` ([1,1]: box filter / nearest,
[1,3,3,1]: the FIR filter of NCSN++). Initialisation: EDM's xavier_uniform (1e-5 for the last
conv of a block, attention proj and output conv; sqrt(0.2) for qkv), zero biases.

Flax tree (submodule names = EDM's, so that an EDM name maps to a Flax path by splitting on '.';
`edm_layers` holds the mapping and the converters):

    map_noise/freqs        (NCSN++ only; see below)     map_label/{kernel,bias}
    map_augment/kernel     map_layer0/{kernel,bias}     map_layer1/{kernel,bias}
    enc/<R>x<R>_conv, enc/<R>x<R>_down, enc/<R>x<R>_block<i>, enc/<R>x<R>_aux_{skip,residual}
    dec/<R>x<R>_in0, _in1, _up, _block<i>, _aux_norm, _aux_conv
    blocks: norm0, conv0, affine, norm1, conv1, [skip], [norm2, qkv, proj]

Buffers. EDM's `resample_filter` buffers are constants fixed by the `resample_filter` field: they
are not in the Flax tree, and `convert_state_dict` checks their values where present. NCSN++'s Fourier
frequencies (`map_noise.freqs`, an EDM buffer drawn once as randn * 16 and never trained) are kept
in the params tree as `map_noise/freqs` so that converted EDM networks reproduce EDM exactly under
the repository's `{'params': params}` contract; a fresh Flax init draws them from the 'params' rng
as N(0, 16^2), like EDM. The forward pass applies `stop_gradient` to them, so they are never
trained by gradients (keep weight decay off for them). `param_count(params)` excludes them and
equals EDM's `sum(p.numel() for p in net.parameters())`.

Parameters are float32; activations run in `dtype`; GroupNorm statistics and the attention
softmax are computed in float32; the output and `features` are float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill.models.edm_layers import (Conv2d, GroupNorm, Init, Linear, Namespace, UNetBlock, abstract_params,
                                        check_inputs, convert_state_dict, decoder_blocks, encoder_blocks,
                                        positional_embedding, to_state_dict)

__all__ = ["SongUNet", "FourierEmbedding", "EDM_CIFAR10", "BUFFERS", "param_count", "abstract_params",
           "convert_state_dict", "to_state_dict"]

SQRT_HALF = float(np.sqrt(0.5))

# EDM's published CIFAR-10 architectures (NVlabs/edm train.py, --arch=ddpmpp / ncsnpp). The
# training configs add dropout=0.13, augment_dim=9 (with --augment > 0) and num_classes=10 (--cond).
EDM_CIFAR10 = {
    "ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=(1, 1), model_channels=128, channel_mult=(2, 2, 2)),
    "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=(1, 3, 3, 1), model_channels=128, channel_mult=(2, 2, 2)),
}

# Leaves of the Flax tree that are EDM buffers, not EDM parameters.
BUFFERS = (("map_noise", "freqs"),)

# SongUNet's EDM initialisers: xavier_uniform, zero biases.
INIT = Init("xavier_uniform")
INIT_ZERO = Init("xavier_uniform", 1e-5)          # last conv of a block, attention proj, output conv
INIT_ATTN = Init("xavier_uniform", float(np.sqrt(0.2)))  # qkv


class FourierEmbedding(nn.Module):
    """EDM `FourierEmbedding`: [cos(2 pi x f), sin(2 pi x f)] with fixed random f ~ N(0, scale^2)
    (a buffer in EDM, the untrained leaf `freqs` here, see the module docstring)."""

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x):
        freqs = self.param("freqs", nn.initializers.normal(self.scale), (self.num_channels // 2,), jnp.float32)
        x = jnp.outer(x.astype(jnp.float32), 2 * np.pi * jax.lax.stop_gradient(freqs))
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def _encoder(net: "SongUNet", x, emb, train):
    """EDM SongUNet's `enc` (built and run in EDM's order): (features, skips)."""
    block = net.block_kwargs()
    conv = dict(resample_filter=net.resample_filter, init_spec=INIT, dtype=net.dtype)
    skips, aux, res0 = [], x, x.shape[1]
    for level, mult in enumerate(net.channel_mult):
        res = res0 >> level
        if level == 0:
            x = Conv2d(net.model_channels, 3, name=f"{res}x{res}_conv", **conv)(x)
        else:
            x = UNetBlock(x.shape[-1], down=True, name=f"{res}x{res}_down", **block)(x, emb, train)
            if net.encoder_type == "skip":
                aux = Conv2d(aux.shape[-1], 0, down=True, name=f"{res}x{res}_aux_down", **conv)(aux)
                x = x + Conv2d(x.shape[-1], 1, name=f"{res}x{res}_aux_skip", **conv)(aux)
            if net.encoder_type == "residual":
                aux = Conv2d(x.shape[-1], 3, down=True, fused_resample=True, name=f"{res}x{res}_aux_residual",
                             **conv)(aux)
                x = aux = (x + aux) * SQRT_HALF
        skips.append(x)
        x = encoder_blocks(net, x, skips, emb, train, mult)
    return x, skips


def _decoder(net: "SongUNet", x, skips, emb, train):
    """EDM SongUNet's `dec`: the output (the sum over levels of the 'aux' outputs)."""
    levels, out = len(net.channel_mult), None
    for level, mult in reversed(list(enumerate(net.channel_mult))):
        x = decoder_blocks(net, x, skips, emb, train, mult, lowest=level == levels - 1, attention_last_only=True)
        if net.decoder_type == "skip" or level == 0:
            res = x.shape[1]
            if out is not None:
                out = Conv2d(net.out_channels, 0, up=True, resample_filter=net.resample_filter, dtype=net.dtype,
                             name=f"{res}x{res}_aux_up")(out)
            tmp = GroupNorm(1e-6, net.dtype, name=f"{res}x{res}_aux_norm")(x)
            tmp = Conv2d(net.out_channels, 3, init_spec=INIT_ZERO, dtype=net.dtype, name=f"{res}x{res}_aux_conv")(
                nn.silu(tmp))
            out = tmp if out is None else tmp + out
    return out


class SongUNet(nn.Module):
    """EDM's SongUNet (DDPM++ / NCSN++), F(x_in [B, H, W, C], c_noise [B]) -> [B, H, W, out_channels].

    Fields carry EDM's names (`num_classes` is EDM's `label_dim`); `EDM_CIFAR10[arch]` holds the
    published architectures. `labels` are class indices [B] (or float vectors [B, num_classes],
    EDM's `class_labels`), required when `num_classes > 0` and ignored otherwise. `augment_labels`
    [B, augment_dim] default to zeros (no augmentation, EDM's inference). `features=True` also
    returns the encoder's last activation [B, H / 2^(L-1), W / 2^(L-1), model_channels *
    channel_mult[-1]] (float32). `train=True` enables dropout and label dropout ('dropout' rng).
    """

    out_channels: int
    model_channels: int = 128
    channel_mult: tuple = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    num_classes: int = 0
    augment_dim: int = 0
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple = (1, 1)
    dtype: Any = jnp.float32

    def __post_init__(self):
        for f in ("channel_mult", "attn_resolutions", "resample_filter"):
            v = getattr(self, f)
            if isinstance(v, list):  # configs may hand lists; fields must be hashable
                object.__setattr__(self, f, tuple(v))
        super().__post_init__()

    def block_kwargs(self) -> dict:
        """EDM SongUNet's `block_kwargs` of its UNetBlocks."""
        return dict(num_heads=1, dropout=self.dropout, skip_scale=SQRT_HALF, eps=1e-6,
                    resample_filter=self.resample_filter, resample_proj=True, adaptive_scale=False,
                    init_spec=INIT, init_zero=INIT_ZERO, init_attn=INIT_ATTN, dtype=self.dtype)

    def _check_fields(self):
        allowed = dict(embedding_type=("positional", "fourier"), encoder_type=("standard", "skip", "residual"),
                       decoder_type=("standard", "skip"))
        for f, vals in allowed.items():
            if getattr(self, f) not in vals:
                raise ValueError(f"SongUNet.{f}={getattr(self, f)!r} is not allowed; allowed: {list(vals)}")
        if len(self.resample_filter) < 1 or sum(self.resample_filter) == 0:
            raise ValueError(f"SongUNet.resample_filter={self.resample_filter} must be a non-empty filter with a "
                             "non-zero sum")

    @nn.compact
    def __call__(self, x_in, c_noise, labels=None, features: bool = False, train: bool = False,
                 augment_labels=None):
        self._check_fields()
        c_noise, labels, augment_labels = check_inputs(self, x_in, c_noise, labels, augment_labels, train)
        b = x_in.shape[0]
        noise_channels = self.model_channels * self.channel_mult_noise
        emb_channels = self.model_channels * self.channel_mult_emb

        # Mapping network (float32).
        if self.embedding_type == "positional":
            emb = positional_embedding(c_noise, noise_channels, endpoint=True)
        else:
            emb = FourierEmbedding(noise_channels, name="map_noise")(c_noise)
        emb = emb.reshape(b, 2, -1)[:, ::-1].reshape(b, -1)  # [cos, sin] -> [sin, cos]
        if labels is not None:
            emb = emb + Linear(noise_channels, init_spec=INIT, name="map_label")(labels * np.sqrt(self.num_classes))
        if augment_labels is not None:
            emb = emb + Linear(noise_channels, use_bias=False, init_spec=INIT, name="map_augment")(augment_labels)
        emb = nn.silu(Linear(emb_channels, init_spec=INIT, name="map_layer0")(emb))
        emb = nn.silu(Linear(emb_channels, init_spec=INIT, name="map_layer1")(emb)).astype(self.dtype)

        x, skips = Namespace(name="enc")(_encoder, self, x_in.astype(self.dtype), emb, train)
        out = Namespace(name="dec")(_decoder, self, x, skips, emb, train).astype(jnp.float32)
        return (out, x.astype(jnp.float32)) if features else out


def param_count(params) -> int:
    """EDM's parameter count: every leaf of `params` but the buffers in `BUFFERS`."""
    from fdistill import models

    return models.param_count(params, BUFFERS)
