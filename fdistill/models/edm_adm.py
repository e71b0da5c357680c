"""EDM's ADM network (`DhariwalUNet`, Karras et al. 2022, arXiv 2206.00364, Table 7 / App. F.2; after
Dhariwal & Nichol 2021, arXiv 2105.05233) in Flax, parameter-for-parameter the network of EDM's
`training/networks.py`, so that EDM checkpoints convert (`convert_state_dict`).

F(x_in; c_noise, labels) -> [B, H, W, out_channels], with c_noise EDM's noise label (ln(sigma) / 4
for the EDM preconditioning, eq. 7). Layout for an image of resolution R (square, NHWC):

    mapping  emb = silu(map_layer1(silu(map_layer0(PosEmb(c_noise) + map_augment(aug))))
                        + map_label(one_hot(labels)))          (map_augment, map_label: no bias)
    encoder  enc_RxR_conv (3x3); per level l (r = R / 2^l): enc_rxr_down (l > 0, a block that
             2x2-average-pools), then enc_rxr_block0..num_blocks-1; every encoder output is a skip
    decoder  lowest level: dec_rxr_in0 (attention), dec_rxr_in1; other levels: dec_rxr_up (a block
             that nearest-upsamples x2); then per level dec_rxr_block0..num_blocks, each on
             concat([x, skip.pop()]) along channels
    output   out_conv(silu(out_norm(x)))   (3x3)

Block (EDM `UNetBlock`, adaptive scale, skip_scale 1):
    h = conv0(resample(silu(norm0(x)))); scale, shift = split(affine(emb));
    h = conv1(dropout(silu(shift + norm1(h) * (scale + 1)))); x = h + skip(resample(x))
    (skip: 1x1 conv when the channel count changes, else identity), then, with attention,
    x = x + proj(MHA(qkv(norm2(x)))) with num_heads = channels // channels_per_head (0 heads:
    no attention, as in EDM, where channels < 64). GroupNorm: min(32, C // 4) groups, eps 1e-5.

Flax names equal EDM's, with `enc.`/`dec.` turned into `enc_`/`dec_` (a Flax name cannot hold a
dot): `enc.64x64_block0.conv0.weight` is params['enc_64x64_block0']['conv0']['kernel'];
`weight` is `kernel` for convolutions / linear layers and `scale` for GroupNorm.
The qkv channels follow EDM's layout: channel index = head * 3 d + 3 c + {0: q, 1: k, 2: v}, where
d = C / num_heads; the attention output channel is head * d + c.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# EDM's init: kaiming_uniform * sqrt(1/3) gives U(+-1/sqrt(fan_in)) for weights and biases.
_WEIGHT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_ZEROS = nn.initializers.zeros


def _bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def groupnorm_groups(channels: int) -> int:
    """EDM GroupNorm: min(32, channels // 4) groups (at least 4 channels per group)."""
    return min(32, channels // 4)


def positional_embedding(c_noise: jax.Array, num_channels: int, max_positions: int = 10000) -> jax.Array:
    """EDM `PositionalEmbedding` (endpoint=False): [cos(c f), sin(c f)], f_i = max_positions^(-i / (n/2))."""
    half = num_channels // 2
    freqs = (1.0 / max_positions) ** (jnp.arange(half, dtype=jnp.float32) / half)
    x = c_noise.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def _downsample(x: jax.Array) -> jax.Array:
    """EDM's resample_filter [1, 1] down: 2x2 average, stride 2."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample(x: jax.Array) -> jax.Array:
    """EDM's resample_filter [1, 1] up (transposed conv with a 2x2 kernel of ones): nearest x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _conv(features: int, kernel: int, fan_in: int, dtype, name: str, zero: bool = False) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name,
                   kernel_init=_ZEROS if zero else _WEIGHT_INIT,
                   bias_init=_ZEROS if zero else _bias_init(fan_in))


def _dense(features: int, fan_in: int, dtype, name: str, use_bias: bool = True, zero: bool = False,
           kernel_init=None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=kernel_init or (_ZEROS if zero else _WEIGHT_INIT),
                    bias_init=_ZEROS if zero else _bias_init(fan_in))


def _norm(channels: int, dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groupnorm_groups(channels), epsilon=1e-5, dtype=dtype,
                        use_fast_variance=False, name=name)


class UNetBlock(nn.Module):
    """EDM `UNetBlock` as DhariwalUNet configures it (adaptive_scale, skip_scale 1, filter [1, 1])."""

    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    channels_per_head: int = 64
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        dt, cin, cout = self.dtype, x.shape[-1], self.out_channels
        resample = _upsample if self.up else _downsample if self.down else (lambda t: t)
        orig = x
        h = nn.silu(_norm(cin, dt, "norm0")(x))
        h = _conv(cout, 3, 9 * cin, dt, "conv0")(resample(h))
        params = _dense(2 * cout, emb.shape[-1], dt, "affine")(emb)[:, None, None, :]
        scale, shift = jnp.split(params, 2, axis=-1)
        h = nn.silu(shift + _norm(cout, dt, "norm1")(h) * (scale + 1))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(cout, 3, 9 * cout, dt, "conv1", zero=True)(h)
        skip = resample(orig)
        if cout != cin:
            skip = _conv(cout, 1, cin, dt, "skip")(skip)
        x = h + skip

        num_heads = cout // self.channels_per_head if self.attention else 0
        if num_heads:
            b, hh, ww, c = x.shape
            d = c // num_heads
            qkv = _conv(3 * c, 1, c, dt, "qkv")(_norm(c, dt, "norm2")(x))
            qkv = qkv.reshape(b, hh * ww, num_heads, d, 3)
            q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
            # EDM's AttentionOp: softmax over keys of q.k / sqrt(d), computed in float32.
            w = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32) / np.sqrt(d))
            w = jax.nn.softmax(w, axis=-1).astype(dt)
            a = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, hh, ww, c)
            x = _conv(c, 1, c, dt, "proj", zero=True)(a) + x
        return x


class DhariwalUNet(nn.Module):
    """EDM's ADM network; defaults are EDM's ImageNet-64 configuration (with `num_classes=1000`).

    `__call__(x_in [B, H, W, C], c_noise [B], labels int [B] | None, features, train,
    augment_labels [B, augment_dim] | None)`: F [B, H, W, out_channels] float32; with
    `features=True` also the encoder's last activations [B, H / 2^(L-1), W / 2^(L-1),
    model_channels * channel_mult[-1]] (float32). H must equal W and be divisible by 2^(L-1).
    Labels are required when `num_classes > 0` and ignored otherwise; they are one-hot encoded and
    mapped by `map_label` (EDM's bias-free Linear). `augment_dim > 0` creates EDM's `map_augment`;
    augment labels default to zeros (no augmentation, as at inference). `channels_per_head` is
    EDM's UNetBlock argument (DhariwalUNet fixes it to 64; smaller values only for tests).
    Dropout (the 'dropout' rng) and label dropout act only with `train=True`.
    """

    out_channels: int
    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    num_classes: int = 0
    augment_dim: int = 0
    channels_per_head: int = 64
    dtype: Any = jnp.float32

    def _check(self, x: jax.Array, c_noise: jax.Array, labels, augment_labels) -> None:
        if x.ndim != 4:
            raise ValueError(f"DhariwalUNet expects images [B, H, W, C], got shape {x.shape}")
        b, h, w, _ = x.shape
        if h != w:
            raise ValueError(f"DhariwalUNet expects square images, got H x W = {h} x {w}")
        levels = len(self.channel_mult)
        if levels < 1:
            raise ValueError("channel_mult must have at least one level")
        if h % (2 ** (levels - 1)):
            raise ValueError(f"image resolution {h} is not divisible by 2^(len(channel_mult) - 1) = "
                             f"{2 ** (levels - 1)} (channel_mult={tuple(self.channel_mult)})")
        if c_noise.shape != (b,):
            raise ValueError(f"c_noise must have shape [B] = ({b},), got {c_noise.shape}")
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(f"this DhariwalUNet is class-conditional (num_classes={self.num_classes}); "
                                 "pass labels (int [B])")
            if labels.shape != (b,):
                raise ValueError(f"labels must be class indices of shape [B] = ({b},), got {labels.shape}")
        if augment_labels is not None and augment_labels.shape != (b, self.augment_dim):
            raise ValueError(f"augment_labels must have shape [B, augment_dim] = ({b}, {self.augment_dim}), "
                             f"got {augment_labels.shape}")
        for mult in self.channel_mult:
            c = self.model_channels * mult
            if c < 4:
                raise ValueError(f"model_channels * channel_mult = {c} must be at least 4 (GroupNorm)")

    @nn.compact
    def __call__(self, x_in: jax.Array, c_noise: jax.Array, labels: jax.Array | None = None,
                 features: bool = False, train: bool = False, augment_labels: jax.Array | None = None):
        self._check(x_in, c_noise, labels, augment_labels)
        dt = self.dtype
        mc = self.model_channels
        emb_channels = mc * self.channel_mult_emb
        b, res0 = x_in.shape[0], x_in.shape[1]

        # Mapping.
        emb = positional_embedding(c_noise, mc)
        if self.augment_dim:
            aug = jnp.zeros((b, self.augment_dim), jnp.float32) if augment_labels is None else augment_labels
            emb = emb + _dense(mc, self.augment_dim, jnp.float32, "map_augment", use_bias=False,
                               zero=True)(aug.astype(jnp.float32))
        emb = nn.silu(_dense(emb_channels, mc, dt, "map_layer0")(emb.astype(dt)))
        emb = _dense(emb_channels, emb_channels, dt, "map_layer1")(emb)
        if self.num_classes > 0:
            onehot = jax.nn.one_hot(labels, self.num_classes, dtype=dt)
            if train and self.label_dropout:
                keep = jax.random.uniform(self.make_rng("dropout"), (b, 1)) >= self.label_dropout
                onehot = onehot * keep.astype(dt)
            emb = emb + _dense(emb_channels, self.num_classes, dt, "map_label", use_bias=False,
                               kernel_init=nn.initializers.normal(1.0))(onehot)
        emb = nn.silu(emb)

        block = dict(channels_per_head=self.channels_per_head, dropout=self.dropout, dtype=dt)
        # Encoder.
        x = x_in.astype(dt)
        skips = []
        cout = x.shape[-1]
        for level, mult in enumerate(self.channel_mult):
            res = res0 >> level
            if level == 0:
                x = _conv(mc * mult, 3, 9 * cout, dt, f"enc_{res}x{res}_conv")(x)
            else:
                x = UNetBlock(cout, down=True, name=f"enc_{res}x{res}_down", **block)(x, emb, train)
            cout = mc * mult
            skips.append(x)
            for idx in range(self.num_blocks):
                x = UNetBlock(cout, attention=res in self.attn_resolutions, name=f"enc_{res}x{res}_block{idx}",
                              **block)(x, emb, train)
                skips.append(x)
        feats = x

        # Decoder.
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = res0 >> level
            if level == len(self.channel_mult) - 1:
                x = UNetBlock(cout, attention=True, name=f"dec_{res}x{res}_in0", **block)(x, emb, train)
                x = UNetBlock(cout, name=f"dec_{res}x{res}_in1", **block)(x, emb, train)
            else:
                x = UNetBlock(cout, up=True, name=f"dec_{res}x{res}_up", **block)(x, emb, train)
            cout = mc * mult
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = UNetBlock(cout, attention=res in self.attn_resolutions, name=f"dec_{res}x{res}_block{idx}",
                              **block)(x, emb, train)
        assert not skips
        x = nn.silu(_norm(cout, dt, "out_norm")(x))
        out = _conv(self.out_channels, 3, 9 * cout, dt, "out_conv", zero=True)(x).astype(jnp.float32)
        return (out, feats.astype(jnp.float32)) if features else out


# ---------------------------------------------------------------------------------------------
# EDM (PyTorch) state_dict -> Flax params.

_RESAMPLE_FILTER = np.full((1, 1, 2, 2), 0.25, np.float32)


def _torch_name(path: tuple[str, ...]) -> str:
    """Flax param path -> EDM state_dict name (see the module docstring)."""
    top = re.sub(r"^(enc|dec)_", r"\1.", path[0])
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join((top, *path[1:-1], leaf))


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:  # linear [out, in] -> [in, out]
        return value.T
    return value


def init_shapes(module: DhariwalUNet, image_shape: Sequence[int]):
    """The module's parameter shapes (ShapeDtypeStructs) for per-example images [H, W, C], with no
    allocation (`jax.eval_shape`)."""
    shape = tuple(image_shape)[-3:]
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    c = jax.ShapeDtypeStruct((1,), jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32) if module.num_classes > 0 else None
    return jax.eval_shape(module.init, jax.random.key(0), x, c, labels)["params"]


def convert_state_dict(state_dict: Mapping[str, Any], module: DhariwalUNet, image_shape: Sequence[int]):
    """Flax params for `module` from an EDM DhariwalUNet state_dict (`EDMPrecond.model.state_dict()`;
    a leading `model.` is stripped), for per-example images `image_shape` = [H, W, C].

    Conv weights [out, in, kh, kw] become kernels [kh, kw, in, out], Linear weights [out, in]
    kernels [in, out], GroupNorm weights scales. The non-parameter `resample_filter` buffers must be
    EDM's [1, 1] filter (what the Flax network hard-codes) and are dropped. Raises ValueError naming
    every missing, unexpected or mis-shaped entry.
    """
    sd = {}
    for name, value in state_dict.items():
        name = name[len("model."):] if name.startswith("model.") else name
        sd[name] = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    expected = jax.tree_util.tree_flatten_with_path(init_shapes(module, image_shape))[0]

    used, missing, misshaped, bad_buffers = set(), [], [], []
    flat = {}
    for keypath, spec in expected:
        path = tuple(k.key for k in keypath)
        tname = _torch_name(path)
        if tname not in sd:
            missing.append(tname)
            continue
        used.add(tname)
        value = _to_flax(sd[tname], path[-1])
        if value.shape != spec.shape:
            misshaped.append(f"{tname}: got {tuple(sd[tname].shape)} (Flax layout {value.shape}), "
                             f"expected Flax {tuple(spec.shape)}")
            continue
        flat[path] = jnp.asarray(value, jnp.float32)
    unexpected = []
    for name, value in sd.items():
        if name in used:
            continue
        if name.endswith(".resample_filter"):
            if value.shape != _RESAMPLE_FILTER.shape or not np.allclose(value, _RESAMPLE_FILTER):
                bad_buffers.append(f"{name}: only EDM's [1, 1] resample filter is supported, got {value.tolist()}")
            continue
        unexpected.append(name)
    if missing or unexpected or misshaped or bad_buffers:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("unsupported buffers", bad_buffers)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items))
        raise ValueError("EDM DhariwalUNet state_dict does not match the Flax module: " + "; ".join(parts))

    params: dict = {}
    for path, value in flat.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params
