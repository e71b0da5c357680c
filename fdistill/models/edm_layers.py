"""The layers EDM's networks share (Karras et al. 2022, arXiv 2206.00364; NVlabs/edm
`training/networks.py`), in Flax: `weight_init`, `Linear`, `Conv2d` (with FIR up/down-sampling),
`GroupNorm`, `UNetBlock`, the positional noise embedding, the block ladders of one encoder / decoder
level, the checks of a network's inputs, and the EDM state-dict <-> Flax params mapping that
`edm_song.SongUNet` and `edm_adm.DhariwalUNet` both use. Each network module keeps its own plan.

Layout: images are NHWC. Conv kernels are [kh, kw, in, out] (EDM: [out, in, kh, kw]), Linear kernels
[in, out] (EDM: [out, in]), GroupNorm weights `scale`; biases `bias`. Parameters are float32;
activations run in `dtype`; GroupNorm statistics and the attention softmax run in float32.

Names. A network's Flax tree nests EDM's module names: EDM's `enc.64x64_block0.conv0.weight` is
params['enc']['64x64_block0']['conv0']['kernel'] (`Namespace` holds the `enc`/`dec` ModuleDicts),
so `edm_name` turns a Flax path into EDM's name by joining with '.' (`kernel`/`scale` -> `weight`).
EDM's `resample_filter` buffers (one per up/down-sampling Conv2d) are constants fixed by the
network's `resample_filter`, not Flax params: `Conv2d` sows a marker into 'intermediates' so that
`abstract_variables` reads their names off one shape-only trace.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Init(NamedTuple):
    """EDM's init keywords of `Linear` / `Conv2d` (`init_mode`, `init_weight`, `init_bias`): the
    field `init_spec` of the layers here (EDM's `init`; `init` is a Flax Module's method)."""

    mode: str = "kaiming_normal"
    weight: float = 1.0
    bias: float = 0.0


def weight_init(key, shape, mode: str, fan_in: int, fan_out: int) -> jax.Array:
    """EDM `weight_init`: xavier/kaiming, uniform/normal, by the layer's fan-in and fan-out."""
    if mode == "xavier_uniform":
        return np.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, jnp.float32, -1, 1)
    if mode == "xavier_normal":
        return np.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape, jnp.float32)
    if mode == "kaiming_uniform":
        return np.sqrt(3 / fan_in) * jax.random.uniform(key, shape, jnp.float32, -1, 1)
    if mode == "kaiming_normal":
        return np.sqrt(1 / fan_in) * jax.random.normal(key, shape, jnp.float32)
    raise ValueError(f"init mode {mode!r} is not known; allowed: xavier_uniform, xavier_normal, kaiming_uniform, "
                     "kaiming_normal")


def _weight_and_bias(module: nn.Module, init: Init, wshape: tuple, fan_in: int, fan_out: int, use_bias: bool):
    """The `kernel` of shape `wshape` and the `bias` [out] (None without) of an EDM layer, float32."""
    def make(gain):
        if gain == 0:
            return nn.initializers.zeros
        return lambda key, shape: gain * weight_init(key, shape, init.mode, fan_in, fan_out)

    kernel = module.param("kernel", make(init.weight), wshape)
    bias = module.param("bias", make(init.bias), (wshape[-1],)) if use_bias else None
    return kernel, bias


class Linear(nn.Module):
    """EDM `Linear`: x @ kernel + bias, kernel [in, out]."""

    features: int
    use_bias: bool = True
    init_spec: Init = Init()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel, bias = _weight_and_bias(self, self.init_spec, (cin, self.features), cin, self.features, self.use_bias)
        y = x.astype(self.dtype) @ kernel.astype(self.dtype)
        return y if bias is None else y + bias.astype(self.dtype)


def filter2d(resample_filter) -> np.ndarray:
    """EDM's `resample_filter` buffer without its [1, 1] leading axes: outer(f, f) / sum(f)^2."""
    f = np.asarray(resample_filter, dtype=np.float32)
    return (np.outer(f, f) / np.square(f.sum())).astype(np.float32)


def _resample(x, f2d: np.ndarray, *, up: bool, pad: int):
    """Per-channel FIR resampling by 2 (EDM `Conv2d`): conv2d(f, stride 2, padding=pad) down,
    conv_transpose2d(4 f, stride 2, padding=pad) up. The box filter ([1, 1], pad 0) is a 2x2 mean
    down and nearest-neighbour up-sampling."""
    b, h, w, c = x.shape
    if f2d.shape == (2, 2) and pad == 0 and np.all(f2d == f2d[0, 0]):
        if up:
            return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    k = f2d.shape[0]
    if up:
        # conv_transpose(stride s, padding p) == dilate the input by s, pad k - 1 - p, correlate
        # with the flipped kernel.
        wgt = jnp.asarray(np.flip(f2d * 4, (0, 1)).copy(), x.dtype)
        q = k - 1 - pad
        padding, strides, lhs_dil = ((q, q), (q, q)), (1, 1), (2, 2)
    else:
        wgt = jnp.asarray(f2d, x.dtype)
        padding, strides, lhs_dil = ((pad, pad), (pad, pad)), (2, 2), (1, 1)
    wgt = jnp.tile(wgt[:, :, None, None], (1, 1, 1, c))  # HWIO, one filter per channel
    return jax.lax.conv_general_dilated(
        x, wgt, window_strides=strides, padding=padding, lhs_dilation=lhs_dil,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


class Conv2d(nn.Module):
    """EDM `Conv2d`: optional FIR up/down-sampling by 2 (`resample_filter`) and a `kernel` x `kernel`
    convolution with 'same' padding (`kernel=0`: resampling only, no parameters). `fused_resample`
    convolves first with padding w_pad + f_pad, then down-samples without padding (up: the reverse)."""

    out_channels: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: tuple = (1, 1)
    fused_resample: bool = False
    init_spec: Init = Init()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.up and self.down:
            raise ValueError("Conv2d: up and down are exclusive")
        x = x.astype(self.dtype)
        cin, k, cout = x.shape[-1], self.kernel, self.out_channels
        w = b = None
        if k:
            w, b = _weight_and_bias(self, self.init_spec, (k, k, cin, cout), cin * k * k, cout * k * k, self.use_bias)
            w = w.astype(self.dtype)
        f2d = None
        if self.up or self.down:
            f2d = filter2d(self.resample_filter)
            self.sow("intermediates", "resample_filter", ())  # EDM's buffer (see the module docstring)
        w_pad = k // 2
        f_pad = (f2d.shape[0] - 1) // 2 if f2d is not None else 0

        conv = lambda x, pad: jax.lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.fused_resample and self.up and w is not None:
            x = conv(_resample(x, f2d, up=True, pad=max(f_pad - w_pad, 0)), max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = _resample(conv(x, w_pad + f_pad), f2d, up=False, pad=0)
        else:
            if f2d is not None:
                x = _resample(x, f2d, up=self.up, pad=f_pad)
            if w is not None:
                x = conv(x, w_pad)
        return x if b is None else x + b.astype(self.dtype)


def num_groups(channels: int, groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM `GroupNorm`'s group count: min(32, channels // 4)."""
    return min(groups, channels // min_channels_per_group)


class GroupNorm(nn.Module):
    """EDM `GroupNorm` (min(32, C // 4) groups; statistics in float32, biased variance)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        g = num_groups(c)
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
    """EDM `UNetBlock`, with EDM's defaults (DhariwalUNet's settings; SongUNet passes its own).

    GroupNorm, SiLU, 3x3 conv0 (resampled up/down), then with `adaptive_scale`
    SiLU(shift + norm1(x) * (scale + 1)) from affine(emb) = [scale, shift], else SiLU(norm1(x +
    affine(emb))); dropout, 3x3 conv1; + skip (a `Conv2d` with the same resampling, a 1x1 projection
    when the channels change or `resample_proj`); times `skip_scale`. With attention (num_heads, or
    out_channels // channels_per_head heads; none when that is 0): x + proj(softmax(q.k / sqrt(d)) v)
    on qkv(norm2(x)), times `skip_scale`. qkv channels follow EDM: head * 3 d + 3 c + {q, k, v}.
    """

    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int | None = None
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: tuple = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    init_spec: Init = Init()
    init_zero: Init = Init(weight=0.0)
    init_attn: Init | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        dt, cin, cout = self.dtype, x.shape[-1], self.out_channels
        orig = x
        rs = dict(up=self.up, down=self.down, resample_filter=self.resample_filter, init_spec=self.init_spec, dtype=dt)
        x = Conv2d(cout, 3, name="conv0", **rs)(nn.silu(GroupNorm(self.eps, dt, name="norm0")(x)))
        affine = Linear(cout * (2 if self.adaptive_scale else 1), init_spec=self.init_spec, dtype=dt, name="affine")
        params = affine(emb)[:, None, None, :]
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + GroupNorm(self.eps, dt, name="norm1")(x) * (scale + 1))
        else:
            x = nn.silu(GroupNorm(self.eps, dt, name="norm1")(x + params))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Conv2d(cout, 3, init_spec=self.init_zero, dtype=dt, name="conv1")(x)
        if cout != cin or self.up or self.down:
            orig = Conv2d(cout, 1 if (self.resample_proj or cout != cin) else 0, name="skip", **rs)(orig)
        x = (x + orig.astype(dt)) * self.skip_scale

        heads = 0
        if self.attention:
            heads = self.num_heads if self.num_heads is not None else cout // self.channels_per_head
        if heads:
            b, h, w, c = x.shape
            if c % heads:
                raise ValueError(f"UNetBlock: {heads} attention heads do not divide {c} channels")
            d = c // heads
            qkv = Conv2d(3 * c, 1, init_spec=self.init_attn or self.init_spec, dtype=dt, name="qkv")(
                GroupNorm(self.eps, dt, name="norm2")(x))
            qkv = qkv.reshape(b, h * w, heads, d, 3)
            q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
            # EDM's AttentionOp: softmax over keys of q.k / sqrt(d), in float32.
            logits = jnp.einsum("bqhc,bkhc->bhqk", q.astype(jnp.float32), k.astype(jnp.float32) / np.sqrt(d))
            a = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1).astype(dt), v).reshape(b, h, w, c)
            x = (Conv2d(c, 1, init_spec=self.init_zero, dtype=dt, name="proj")(a) + x) * self.skip_scale
        return x


def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
    """EDM `PositionalEmbedding`: [cos(x f), sin(x f)], f_i = (1 / max_positions)^(i / (N/2 - endpoint))."""
    half = num_channels // 2
    freqs = np.arange(half, dtype=np.float32) / (half - (1 if endpoint else 0))
    x = jnp.outer(x.astype(jnp.float32), jnp.asarray((1 / max_positions) ** freqs, jnp.float32))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def encoder_blocks(net: nn.Module, x, skips: list, emb, train: bool, mult: int):
    """The `num_blocks` UNetBlocks `<res>x<res>_block<i>` ending a level of the encoders of EDM's
    SongUNet and DhariwalUNet (res: that of x; attention at `attn_resolutions`); each output is
    appended to `skips`."""
    res = x.shape[1]
    for idx in range(net.num_blocks):
        x = UNetBlock(net.model_channels * mult, attention=res in net.attn_resolutions, name=f"{res}x{res}_block{idx}",
                      **net.block_kwargs())(x, emb, train)
        skips.append(x)
    return x


def decoder_blocks(net: nn.Module, x, skips: list, emb, train: bool, mult: int, lowest: bool,
                   attention_last_only: bool):
    """One level of the decoders of EDM's SongUNet and DhariwalUNet: `in0` (with attention) and
    `in1` at the lowest level, else the up-sampling block `up`; then `num_blocks + 1` UNetBlocks
    `block<i>` on [x, skips.pop()], with attention at `attn_resolutions` (SongUNet: in the last only)."""
    res = x.shape[1] if lowest else 2 * x.shape[1]
    block, name = net.block_kwargs(), f"{res}x{res}_"
    if lowest:
        x = UNetBlock(x.shape[-1], attention=True, name=name + "in0", **block)(x, emb, train)
        x = UNetBlock(x.shape[-1], name=name + "in1", **block)(x, emb, train)
    else:
        x = UNetBlock(x.shape[-1], up=True, name=name + "up", **block)(x, emb, train)
    for idx in range(net.num_blocks + 1):
        attention = res in net.attn_resolutions and (idx == net.num_blocks or not attention_last_only)
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = UNetBlock(net.model_channels * mult, attention=attention, name=f"{name}block{idx}", **block)(x, emb, train)
    return x


class Namespace(nn.Module):
    """A named group of submodules, EDM's `torch.nn.ModuleDict`s `enc` and `dec`:
    `Namespace(name='enc')(fn, *args)` returns fn(*args), and the modules `fn` creates are children
    of the namespace (their params nest under params['enc'])."""

    @nn.compact
    def __call__(self, fn, *args):
        return fn(*args)


# ----------------------------------------------------------------------------------------------
# Inputs of a network (SongUNet / DhariwalUNet fields: channel_mult, num_classes, label_dropout,
# augment_dim).

def check_inputs(net: nn.Module, x, c_noise, labels, augment_labels, train: bool):
    """Checks the inputs of an EDM network `net` (called inside its compact `__call__`) and returns
    (c_noise [B] float32, class labels [B, num_classes] float32 or None, augment labels [B,
    augment_dim] or None). Labels are class indices [B] (one-hot encoded) or vectors (EDM's
    `class_labels`), dropped with probability `label_dropout` when training ('dropout' rng);
    augment labels default to zeros (no augmentation, EDM's inference)."""
    kind = type(net).__name__
    if x.ndim != 4:
        raise ValueError(f"{kind} expects images [B, H, W, C], got shape {x.shape}")
    b, h, w, _ = x.shape
    if h != w:
        raise ValueError(f"{kind} expects square images (EDM's img_resolution), got H x W = {h} x {w}")
    if not net.channel_mult:
        raise ValueError(f"{kind}.channel_mult must name at least one level")
    factor = 2 ** (len(net.channel_mult) - 1)
    if h % factor:
        raise ValueError(f"image resolution {h} is not divisible by 2^(len(channel_mult) - 1) = {factor} "
                         f"(channel_mult={tuple(net.channel_mult)})")
    c_noise = jnp.asarray(c_noise, jnp.float32)
    if c_noise.ndim == 0:
        c_noise = jnp.broadcast_to(c_noise, (b,))
    if c_noise.shape != (b,):
        raise ValueError(f"c_noise must have shape [B] = [{b}], got {c_noise.shape}")

    onehot = None
    if net.num_classes:
        if labels is None:
            raise ValueError(f"this {kind} is class-conditional (num_classes={net.num_classes}); pass labels")
        labels = jnp.asarray(labels)
        if labels.shape == (b,):
            onehot = jax.nn.one_hot(labels, net.num_classes, dtype=jnp.float32)
        elif labels.shape == (b, net.num_classes):
            onehot = labels.astype(jnp.float32)
        else:
            raise ValueError(f"labels must be class indices [B] = [{b}] or vectors [B, {net.num_classes}], "
                             f"got shape {labels.shape}")
        if train and net.label_dropout:
            keep = jax.random.uniform(net.make_rng("dropout"), (b, 1)) >= net.label_dropout
            onehot = onehot * keep.astype(onehot.dtype)

    if augment_labels is not None and not net.augment_dim:
        raise ValueError(f"augment_labels given but {kind}.augment_dim = 0")
    if net.augment_dim:
        if augment_labels is None:
            augment_labels = jnp.zeros((b, net.augment_dim), jnp.float32)
        elif augment_labels.shape != (b, net.augment_dim):
            raise ValueError(f"augment_labels must have shape [B, augment_dim] = [{b}, {net.augment_dim}], "
                             f"got {augment_labels.shape}")
    return c_noise, onehot, augment_labels


# ----------------------------------------------------------------------------------------------
# Shapes, and EDM state dicts <-> Flax params.

def abstract_variables(module: nn.Module, image_shape) -> tuple[dict, list[str]]:
    """(params as ShapeDtypeStructs, EDM's `resample_filter` buffer names) of `module` for images of
    `image_shape` ((H, W, C) or (B, H, W, C)), from one `jax.eval_shape` trace (nothing allocated)."""
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) == 3:
        image_shape = (1,) + image_shape
    if len(image_shape) != 4:
        raise ValueError(f"image_shape must be (H, W, C) or (B, H, W, C), got {image_shape}")
    b = image_shape[0]
    x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    c = jax.ShapeDtypeStruct((b,), jnp.float32)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32) if module.num_classes else None
    variables = jax.eval_shape(lambda k, x, c, l: module.init(k, x, c, l, mutable=["params", "intermediates"]),
                               jax.random.key(0), x, c, labels)
    buffers = [edm_name(path) for path in _flatten(variables.get("intermediates", {}))]
    return variables["params"], buffers


def abstract_params(module: nn.Module, image_shape) -> dict:
    """The params tree of `module` for images of `image_shape` ((H, W, C) or (B, H, W, C)) as
    ShapeDtypeStructs (`jax.eval_shape`: nothing is allocated)."""
    return abstract_variables(module, image_shape)[0]


def edm_name(path: tuple[str, ...]) -> str:
    """EDM's state-dict name of a Flax param path (`kernel` and `scale` are EDM's `weight`)."""
    return ".".join(path[:-1] + ({"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1]),))


def _flatten(tree, prefix=()) -> dict:
    """{path: leaf} of a nested dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _to_edm(value: np.ndarray) -> np.ndarray:
    """Conv [kh, kw, in, out] -> [out, in, kh, kw], Linear [in, out] -> [out, in]."""
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value


def _to_flax(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T if value.ndim == 2 else value


def to_state_dict(params, module: nn.Module, image_shape) -> dict[str, np.ndarray]:
    """The inverse of `convert_state_dict`: EDM's state dict (names, [out, in, kh, kw] convs, [out,
    in] linears, the `resample_filter` buffers) of Flax `params`, e.g. to export a network trained
    here to EDM's code."""
    out = {edm_name(path): np.ascontiguousarray(_to_edm(np.asarray(v, np.float32)))
           for path, v in _flatten(params).items()}
    f2d = filter2d(module.resample_filter)[None, None]
    out.update({name: f2d for name in abstract_variables(module, image_shape)[1]})
    return out


def convert_state_dict(state_dict: Mapping[str, Any], module: nn.Module, image_shape) -> dict:
    """Flax params of `module` from an EDM network's `state_dict` (`EDMPrecond.model.state_dict()`;
    a leading 'model.' is stripped), for images of `image_shape` ((H, W, C) or (B, H, W, C)).

    Names map by `edm_name`; Conv2d weights [out, in, kh, kw] become kernels [kh, kw, in, out],
    Linear weights [out, in] kernels [in, out], GroupNorm weights scales; biases (and NCSN++'s
    `map_noise.freqs`) are copied. `resample_filter` buffers, where present, are checked against
    `module.resample_filter` and dropped. Raises ValueError listing missing, unexpected and
    mis-shaped names.
    """
    expected, buffers = abstract_variables(module, image_shape)
    expected = {edm_name(path): (path, spec) for path, spec in _flatten(expected).items()}
    sd = {str(k): v for k, v in state_dict.items()}
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    f_expected = filter2d(module.resample_filter)

    params, unexpected, misshaped, wrong_buffers = {}, [], {}, []
    for name, value in sd.items():
        value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if name in buffers:
            if value.size != f_expected.size or not np.allclose(value.reshape(f_expected.shape), f_expected):
                wrong_buffers.append(name)
        elif name not in expected:
            unexpected.append(name)
        else:
            path, spec = expected[name]
            value = _to_flax(value)
            if value.shape != spec.shape:
                misshaped[name] = f"{name}: {value.shape} after transposing, expected {spec.shape}"
                continue
            node = params
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = jnp.asarray(np.ascontiguousarray(value, np.float32))
    missing = [name for name in expected if name not in sd]
    if missing or unexpected or misshaped or wrong_buffers:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", list(misshaped.values())),
                             ("resample_filter differing from the network's resample filter "
                              f"{tuple(module.resample_filter)}", wrong_buffers)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(sorted(items)[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise ValueError(f"EDM state_dict does not match this {type(module).__name__}:\n  " + "\n  ".join(lines))
    return params
