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

UNetBlock (DDPM++ residual block, EDM `adaptive_scale=False`): GroupNorm, SiLU, 3x3 conv (with
FIR up/down-sampling), + affine(emb), GroupNorm, SiLU, dropout, 3x3 conv; + skip (1x1 conv with
the same resampling when the shape changes); times sqrt(1/2); then optional one-head
self-attention (GroupNorm, 1x1 qkv, softmax(q.k / sqrt(c)), 1x1 proj), residual, times sqrt(1/2).
GroupNorm uses min(32, C // 4) groups and eps 1e-6. Resampling uses the normalised outer product of
`resample_filter` ([1,1]: box filter / nearest, [1,3,3,1]: the FIR filter of NCSN++).

Flax tree (submodule names = EDM's, so that an EDM name maps to a Flax path by splitting on '.'):

    map_noise/freqs        (NCSN++ only; see below)     map_label/{kernel,bias}
    map_augment/kernel     map_layer0/{kernel,bias}     map_layer1/{kernel,bias}
    enc/<R>x<R>_conv, enc/<R>x<R>_down, enc/<R>x<R>_block<i>, enc/<R>x<R>_aux_{skip,residual}
    dec/<R>x<R>_in0, _in1, _up, _block<i>, _aux_norm, _aux_conv
    blocks: norm0, conv0, affine, norm1, conv1, [skip], [norm2, qkv, proj]

Conv and Linear weights are `kernel` ([kh, kw, in, out] / [in, out]; EDM: [out, in, kh, kw] /
[out, in]), GroupNorm weights are `scale`; biases are `bias`.

Buffers. EDM's `resample_filter` buffers are constants fixed by the `resample_filter` field: they
are not in the Flax tree, and `convert_state_dict` checks their values. NCSN++'s Fourier
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

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------------------------
# Initialisers (EDM `weight_init`): xavier_uniform over fan_in = in * k * k, fan_out = out * k * k,
# times `init_weight`; biases start at zero.

def _xavier_uniform(gain: float = 1.0):
    return nn.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform")


INIT = _xavier_uniform(1.0)
INIT_ZERO = _xavier_uniform(1e-5)          # last conv of a block, attention proj, output conv
INIT_ATTN = _xavier_uniform(float(np.sqrt(0.2)))  # qkv


def _filter2d(resample_filter) -> np.ndarray:
    f = np.asarray(resample_filter, dtype=np.float32)
    return (np.outer(f, f) / np.square(f.sum())).astype(np.float32)


def _depthwise(x, f2d: np.ndarray, *, up: bool, pad: int):
    """Per-channel FIR resampling by 2: torch conv2d(stride 2, padding=pad) for down-sampling,
    conv_transpose2d(4 f, stride 2, padding=pad) for up-sampling (EDM `Conv2d`)."""
    c = x.shape[-1]
    k = f2d.shape[0]
    if up:
        # conv_transpose(stride s, padding p) == dilate the input by s, pad k - 1 - p, correlate
        # with the flipped kernel.
        w = jnp.asarray(np.flip(f2d * 4, (0, 1)).copy(), x.dtype)
        q = k - 1 - pad
        padding, strides, lhs_dil = ((q, q), (q, q)), (1, 1), (2, 2)
    else:
        w = jnp.asarray(f2d, x.dtype)
        padding, strides, lhs_dil = ((pad, pad), (pad, pad)), (2, 2), (1, 1)
    w = jnp.tile(w[:, :, None, None], (1, 1, 1, c))  # HWIO, one filter per channel
    return jax.lax.conv_general_dilated(
        x, w, window_strides=strides, padding=padding, lhs_dilation=lhs_dil,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


class Linear(nn.Module):
    """x @ kernel + bias (EDM `Linear`; kernel [in, out])."""

    features: int
    use_bias: bool = True
    kernel_init: Any = INIT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = x.astype(self.dtype) @ kernel.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class Conv2d(nn.Module):
    """EDM `Conv2d`: optional FIR up/down-sampling by 2 and a `kernel` x `kernel` convolution with
    'same' padding (`kernel=0`: resampling only, no parameters). `fused_resample` (down only in
    SongUNet) convolves first with padding w_pad + f_pad, then down-samples without padding."""

    out_channels: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: tuple = (1, 1)
    fused_resample: bool = False
    kernel_init: Any = INIT
    dtype: Any = jnp.float32

    def _conv(self, x, w, pad):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @nn.compact
    def __call__(self, x):
        if self.up and self.down:
            raise ValueError("Conv2d: up and down are exclusive")
        x = x.astype(self.dtype)
        cin = x.shape[-1]
        w = None
        if self.kernel:
            w = self.param("kernel", self.kernel_init, (self.kernel, self.kernel, cin, self.out_channels),
                           jnp.float32).astype(self.dtype)
        f2d = _filter2d(self.resample_filter) if (self.up or self.down) else None
        w_pad = self.kernel // 2 if w is not None else 0
        f_pad = (f2d.shape[0] - 1) // 2 if f2d is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = _depthwise(x, f2d, up=True, pad=max(f_pad - w_pad, 0))
            x = self._conv(x, w, max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = self._conv(x, w, w_pad + f_pad)
            x = _depthwise(x, f2d, up=False, pad=0)
        else:
            if self.up:
                x = _depthwise(x, f2d, up=True, pad=f_pad)
            if self.down:
                x = _depthwise(x, f2d, up=False, pad=f_pad)
            if w is not None:
                x = self._conv(x, w, w_pad)
        if w is not None and self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.out_channels,), jnp.float32).astype(self.dtype)
        return x


def num_groups(channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM GroupNorm's group count: min(32, channels // 4)."""
    return min(num_groups, channels // min_channels_per_group)


class GroupNorm(nn.Module):
    """EDM `GroupNorm` (min(32, C // 4) groups; statistics in float32, biased variance)."""

    eps: float = 1e-5
    num_groups: int = 32
    min_channels_per_group: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        g = num_groups(c, self.num_groups, self.min_channels_per_group)
        if g < 1 or c % g:
            raise ValueError(f"GroupNorm: {c} channels cannot be split into min(32, {c} // 4) = {g} groups; "
                             "use channel counts that are multiples of 4 (and of 32 above 128)")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xg = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * scale + bias).astype(self.dtype)


class UNetBlock(nn.Module):
    """EDM `UNetBlock` with SongUNet's settings as defaults (see the module docstring)."""

    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int = 1
    dropout: float = 0.0
    skip_scale: float = SQRT_HALF
    eps: float = 1e-6
    resample_filter: tuple = (1, 1)
    resample_proj: bool = True
    adaptive_scale: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        dt, cout = self.dtype, self.out_channels
        cin = x.shape[-1]
        orig = x
        rs = dict(resample_filter=self.resample_filter, dtype=dt)
        x = Conv2d(cout, 3, up=self.up, down=self.down, name="conv0", **rs)(
            nn.silu(GroupNorm(self.eps, dtype=dt, name="norm0")(x)))
        params = Linear(cout * (2 if self.adaptive_scale else 1), dtype=dt, name="affine")(emb)[:, None, None, :]
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + GroupNorm(self.eps, dtype=dt, name="norm1")(x) * (scale + 1))
        else:
            x = nn.silu(GroupNorm(self.eps, dtype=dt, name="norm1")(x + params))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Conv2d(cout, 3, kernel_init=INIT_ZERO, dtype=dt, name="conv1")(x)
        if cout != cin or self.up or self.down:
            kernel = 1 if (self.resample_proj or cout != cin) else 0
            orig = Conv2d(cout, kernel, up=self.up, down=self.down, name="skip", **rs)(orig)
        x = (x + orig.astype(dt)) * self.skip_scale

        if self.attention and self.num_heads:
            b, h, w, c = x.shape
            heads = self.num_heads
            if c % heads:
                raise ValueError(f"UNetBlock: {heads} attention heads do not divide {c} channels")
            qkv = Conv2d(3 * c, 1, kernel_init=INIT_ATTN, dtype=dt, name="qkv")(
                GroupNorm(self.eps, dtype=dt, name="norm2")(x))
            # EDM's channel order of qkv: (head, channel, {q, k, v}).
            qkv = qkv.reshape(b, h * w, heads, c // heads, 3)
            q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
            logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(jnp.float32),
                                k.astype(jnp.float32) / np.sqrt(c // heads))
            wts = jax.nn.softmax(logits, axis=-1).astype(dt)
            a = jnp.einsum("bhqk,bkhc->bqhc", wts, v).reshape(b, h, w, c)
            x = (Conv2d(c, 1, kernel_init=INIT_ZERO, dtype=dt, name="proj")(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """[cos(x f), sin(x f)] with f_i = (1 / max_positions)^(i / (N/2 - endpoint)) (EDM)."""

    num_channels: int
    max_positions: int = 10000
    endpoint: bool = False

    def __call__(self, x):
        half = self.num_channels // 2
        freqs = np.arange(half, dtype=np.float32) / (half - (1 if self.endpoint else 0))
        freqs = jnp.asarray((1 / self.max_positions) ** freqs, jnp.float32)
        x = jnp.outer(x.astype(jnp.float32), freqs)
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
    """[cos(2 pi x f), sin(2 pi x f)] with fixed random f ~ N(0, scale^2) (EDM; a buffer there, the
    untrained leaf `freqs` here, see the module docstring)."""

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x):
        freqs = self.param("freqs", nn.initializers.normal(self.scale), (self.num_channels // 2,), jnp.float32)
        x = jnp.outer(x.astype(jnp.float32), 2 * np.pi * jax.lax.stop_gradient(freqs))
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


# ----------------------------------------------------------------------------------------------
# The layer plan: EDM's module dictionaries `enc` and `dec`, in order.

def _plan(m, img_resolution: int, in_channels: int):
    """Lists of (name, kind, kwargs) for the encoder and the decoder, in EDM's order. Kinds:
    'conv', 'block', 'aux_down', 'aux_skip', 'aux_residual', 'aux_up', 'aux_norm', 'aux_conv';
    blocks carry `concat` (they read [x, skip])."""
    rf = tuple(m.resample_filter)
    enc, dec = [], []
    cout = caux = in_channels
    skips = []
    for level, mult in enumerate(m.channel_mult):
        res = img_resolution >> level
        if level == 0:
            cout = m.model_channels
            enc.append((f"{res}x{res}_conv", "conv", dict(out_channels=cout, kernel=3)))
        else:
            enc.append((f"{res}x{res}_down", "block", dict(out_channels=cout, down=True, concat=False)))
            if m.encoder_type == "skip":
                enc.append((f"{res}x{res}_aux_down", "aux_down", dict(out_channels=caux, kernel=0, down=True)))
                enc.append((f"{res}x{res}_aux_skip", "aux_skip", dict(out_channels=cout, kernel=1)))
            if m.encoder_type == "residual":
                enc.append((f"{res}x{res}_aux_residual", "aux_residual",
                            dict(out_channels=cout, kernel=3, down=True, fused_resample=True)))
                caux = cout
        skips.append(cout)
        for idx in range(m.num_blocks):
            cout = m.model_channels * mult
            enc.append((f"{res}x{res}_block{idx}", "block",
                        dict(out_channels=cout, attention=res in m.attn_resolutions, concat=False)))
            skips.append(cout)
    levels = len(m.channel_mult)
    for level, mult in reversed(list(enumerate(m.channel_mult))):
        res = img_resolution >> level
        if level == levels - 1:
            dec.append((f"{res}x{res}_in0", "block", dict(out_channels=cout, attention=True, concat=False)))
            dec.append((f"{res}x{res}_in1", "block", dict(out_channels=cout, concat=False)))
        else:
            dec.append((f"{res}x{res}_up", "block", dict(out_channels=cout, up=True, concat=False)))
        for idx in range(m.num_blocks + 1):
            skips.pop()
            cout = m.model_channels * mult
            dec.append((f"{res}x{res}_block{idx}", "block",
                        dict(out_channels=cout, attention=(idx == m.num_blocks and res in m.attn_resolutions),
                             concat=True)))
        if m.decoder_type == "skip" or level == 0:
            if m.decoder_type == "skip" and level < levels - 1:
                dec.append((f"{res}x{res}_aux_up", "aux_up", dict(out_channels=m.out_channels, kernel=0, up=True)))
            dec.append((f"{res}x{res}_aux_norm", "aux_norm", {}))
            dec.append((f"{res}x{res}_aux_conv", "aux_conv", dict(out_channels=m.out_channels, kernel=3)))
    for entries in (enc, dec):
        for _, kind, kw in entries:
            if kind != "aux_norm":
                kw.setdefault("resample_filter", rf)
    return enc, dec


class _Arch(NamedTuple):
    """The SongUNet fields the encoder and decoder read (a plain hashable value, not a Module)."""

    out_channels: int
    model_channels: int
    channel_mult: tuple
    num_blocks: int
    attn_resolutions: tuple
    dropout: float
    encoder_type: str
    decoder_type: str
    resample_filter: tuple
    dtype: Any

    @classmethod
    def of(cls, m) -> "_Arch":
        return cls(*(getattr(m, f) for f in cls._fields))


class _Encoder(nn.Module):
    net: _Arch
    img_resolution: int

    @nn.compact
    def __call__(self, x, emb, train):
        m = self.net
        enc, _ = _plan(m, self.img_resolution, x.shape[-1])
        skips, aux = [], x
        for name, kind, kw in enc:
            if kind == "block":
                kw = {k: v for k, v in kw.items() if k != "concat"}
                x = UNetBlock(dropout=m.dropout, dtype=m.dtype, name=name, **kw)(x, emb, train)
                skips.append(x)
            elif kind == "conv":
                x = Conv2d(dtype=m.dtype, name=name, **kw)(x)
                skips.append(x)
            elif kind == "aux_down":
                aux = Conv2d(dtype=m.dtype, name=name, **kw)(aux)
            elif kind == "aux_skip":
                x = skips[-1] = x + Conv2d(dtype=m.dtype, name=name, **kw)(aux)
            elif kind == "aux_residual":
                x = skips[-1] = aux = (x + Conv2d(dtype=m.dtype, name=name, **kw)(aux)) * SQRT_HALF
        return x, skips


class _Decoder(nn.Module):
    net: _Arch
    img_resolution: int

    @nn.compact
    def __call__(self, x, skips, emb, train, in_channels):
        m = self.net
        _, dec = _plan(m, self.img_resolution, in_channels)
        skips = list(skips)
        aux = tmp = None
        for name, kind, kw in dec:
            if kind == "block":
                kw = dict(kw)
                if kw.pop("concat"):
                    x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = UNetBlock(dropout=m.dropout, dtype=m.dtype, name=name, **kw)(x, emb, train)
            elif kind == "aux_up":
                aux = Conv2d(dtype=m.dtype, name=name, **kw)(aux)
            elif kind == "aux_norm":
                tmp = GroupNorm(1e-6, dtype=m.dtype, name=name)(x)
            elif kind == "aux_conv":
                tmp = Conv2d(kernel_init=INIT_ZERO, dtype=m.dtype, name=name, **kw)(nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
        return aux


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

    def _check_fields(self):
        allowed = dict(embedding_type=("positional", "fourier"), encoder_type=("standard", "skip", "residual"),
                       decoder_type=("standard", "skip"))
        for f, vals in allowed.items():
            if getattr(self, f) not in vals:
                raise ValueError(f"SongUNet.{f}={getattr(self, f)!r} is not allowed; allowed: {list(vals)}")
        if not self.channel_mult:
            raise ValueError("SongUNet.channel_mult must name at least one level")
        if len(self.resample_filter) < 1 or sum(self.resample_filter) == 0:
            raise ValueError(f"SongUNet.resample_filter={self.resample_filter} must be a non-empty filter with a "
                             "non-zero sum")

    def _check_input(self, x):
        if x.ndim != 4:
            raise ValueError(f"SongUNet expects images [B, H, W, C], got shape {x.shape}")
        h, w = x.shape[1:3]
        if h != w:
            raise ValueError(f"SongUNet expects square images (EDM's img_resolution), got {h}x{w}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if h % factor:
            raise ValueError(f"image resolution {h} is not divisible by 2^(len(channel_mult) - 1) = {factor} "
                             f"(channel_mult={self.channel_mult})")

    @nn.compact
    def __call__(self, x_in, c_noise, labels=None, features: bool = False, train: bool = False,
                 augment_labels=None):
        self._check_fields()
        self._check_input(x_in)
        b, res = x_in.shape[0], x_in.shape[1]
        c_noise = jnp.asarray(c_noise, jnp.float32)
        if c_noise.ndim == 0:
            c_noise = jnp.broadcast_to(c_noise, (b,))
        if c_noise.shape != (b,):
            raise ValueError(f"c_noise must have shape [B] = [{b}], got {c_noise.shape}")
        noise_channels = self.model_channels * self.channel_mult_noise
        emb_channels = self.model_channels * self.channel_mult_emb

        # Mapping network (float32).
        if self.embedding_type == "positional":
            emb = PositionalEmbedding(noise_channels, endpoint=True, name="map_noise")(c_noise)
        else:
            emb = FourierEmbedding(noise_channels, name="map_noise")(c_noise)
        emb = emb.reshape(b, 2, -1)[:, ::-1].reshape(b, -1)  # [cos, sin] -> [sin, cos]
        if self.num_classes:
            if labels is None:
                raise ValueError(f"this SongUNet is class-conditional (num_classes={self.num_classes}); pass labels")
            labels = jnp.asarray(labels)
            if labels.shape == (b,):
                onehot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
            elif labels.shape == (b, self.num_classes):
                onehot = labels.astype(jnp.float32)
            else:
                raise ValueError(f"labels must be class indices [B] = [{b}] or vectors [B, {self.num_classes}], "
                                 f"got shape {labels.shape}")
            if train and self.label_dropout:
                keep = jax.random.uniform(self.make_rng("dropout"), (b, 1)) >= self.label_dropout
                onehot = onehot * keep.astype(onehot.dtype)
            emb = emb + Linear(noise_channels, name="map_label")(onehot * np.sqrt(self.num_classes))
        if self.augment_dim:
            if augment_labels is None:
                augment_labels = jnp.zeros((b, self.augment_dim), jnp.float32)
            elif augment_labels.shape != (b, self.augment_dim):
                raise ValueError(f"augment_labels must have shape [{b}, {self.augment_dim}], "
                                 f"got {augment_labels.shape}")
            emb = emb + Linear(noise_channels, use_bias=False, name="map_augment")(augment_labels)
        elif augment_labels is not None:
            raise ValueError("augment_labels given but SongUNet.augment_dim = 0")
        emb = nn.silu(Linear(emb_channels, name="map_layer0")(emb))
        emb = nn.silu(Linear(emb_channels, name="map_layer1")(emb)).astype(self.dtype)

        x = x_in.astype(self.dtype)
        x, skips = _Encoder(_Arch.of(self), res, name="enc")(x, emb, train)
        feats = x
        out = _Decoder(_Arch.of(self), res, name="dec")(x, tuple(skips), emb, train, x_in.shape[-1])
        out = out.astype(jnp.float32)
        return (out, feats.astype(jnp.float32)) if features else out


# ----------------------------------------------------------------------------------------------
# Counting and conversion.

def param_count(params) -> int:
    """EDM's parameter count: every leaf of `params` but the buffers in `BUFFERS`."""
    from fdistill import models

    return models.param_count(params, BUFFERS)


def abstract_params(module: SongUNet, image_shape) -> dict:
    """The params tree of `module` for images of `image_shape` ((H, W, C) or (B, H, W, C)) as
    ShapeDtypeStructs (`jax.eval_shape`: nothing is allocated)."""
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) == 3:
        image_shape = (1,) + image_shape
    if len(image_shape) != 4:
        raise ValueError(f"image_shape must be (H, W, C) or (B, H, W, C), got {image_shape}")
    b = image_shape[0]
    x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    c = jax.ShapeDtypeStruct((b,), jnp.float32)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32) if module.num_classes else None
    return jax.eval_shape(lambda k, x, c, l: module.init(k, x, c, l), jax.random.key(0), x, c, labels)["params"]


def to_state_dict(params, module: SongUNet, image_shape) -> dict[str, np.ndarray]:
    """The inverse of `convert_state_dict`: EDM's SongUNet state dict (names, [out, in, kh, kw]
    convs, [out, in] linears, the `resample_filter` buffers) of Flax `params`, e.g. to export a
    network trained here to EDM's code."""
    image_shape = tuple(image_shape)[-3:]
    out = {}
    for key, value in _flatten(params).items():
        value = np.asarray(value, np.float32)
        if key[-1] in ("kernel", "scale"):
            key = key[:-1] + ("weight",)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        out[".".join(key)] = np.ascontiguousarray(value)
    f2d = _filter2d(module.resample_filter)[None, None]
    out.update({name: f2d for name in _resample_buffers(module, image_shape[0], image_shape[2])})
    return out


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _resample_buffers(module: SongUNet, img_resolution: int, in_channels: int) -> list[str]:
    """EDM's names of the `resample_filter` buffers (one per up/down-sampling Conv2d)."""
    enc, dec = _plan(module, img_resolution, in_channels)
    names = []
    for part, entries in (("enc", enc), ("dec", dec)):
        for name, kind, kw in entries:
            if kind == "block" and (kw.get("up") or kw.get("down")):
                names += [f"{part}.{name}.conv0.resample_filter", f"{part}.{name}.skip.resample_filter"]
            elif kind in ("aux_down", "aux_up", "aux_residual"):
                names.append(f"{part}.{name}.resample_filter")
    return names


def convert_state_dict(state_dict: Mapping[str, Any], module: SongUNet, image_shape) -> dict:
    """Flax params of `module` from an EDM SongUNet `state_dict` (`EDMPrecond.model.state_dict()`;
    a leading 'model.' is stripped).

    `image_shape` is (H, W, C) or (B, H, W, C). Names map by splitting on '.': the last part
    `weight` becomes `kernel` (Conv2d [out, in, kh, kw] -> [kh, kw, in, out], Linear [out, in] ->
    [in, out]) or `scale` (GroupNorm); `bias` and `map_noise.freqs` are copied. `resample_filter`
    buffers are checked against `module.resample_filter` and dropped. Raises ValueError listing
    missing, unexpected and mis-shaped names.
    """
    image_shape = tuple(image_shape)
    if len(image_shape) == 3:
        image_shape = (1,) + image_shape
    expected = abstract_params(module, image_shape)
    expected = _flatten(expected)

    sd = {str(k): v for k, v in state_dict.items()}
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    buffers = set(_resample_buffers(module, image_shape[1], image_shape[3]))
    f_expected = _filter2d(module.resample_filter)

    out, unexpected, misshaped, wrong_buffers = {}, [], {}, []
    for name, value in sd.items():
        value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if name in buffers:
            if value.size != f_expected.size or not np.allclose(value.reshape(f_expected.shape), f_expected):
                wrong_buffers.append(name)
            continue
        parts = tuple(name.split("."))
        stem, last = parts[:-1], parts[-1]
        key = parts
        if last == "weight":
            key = stem + ("kernel",) if stem + ("kernel",) in expected else stem + ("scale",)
        if key not in expected:
            unexpected.append(name)
            continue
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        if tuple(value.shape) != tuple(expected[key].shape):
            misshaped[key] = (f"{name}: {tuple(value.shape)} after transposing, expected "
                              f"{tuple(expected[key].shape)}")
            continue
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    torch_name = lambda k: ".".join(k[:-1] + ({"kernel": "weight", "scale": "weight"}.get(k[-1], k[-1]),))  # noqa: E731
    missing = [torch_name(k) for k in expected if k not in out and k not in misshaped]
    missing += sorted(buffers - set(sd))
    if missing or unexpected or misshaped or wrong_buffers:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", list(misshaped.values())),
                             (f"resample_filter differing from {module.resample_filter}", wrong_buffers)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(sorted(items)[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise ValueError("EDM state_dict does not match this SongUNet:\n  " + "\n  ".join(lines))

    params: dict = {}
    for key, value in out.items():
        node = params
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jnp.asarray(value)
    return params
