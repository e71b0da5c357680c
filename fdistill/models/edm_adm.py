"""EDM's ADM network (`DhariwalUNet`, Karras et al. 2022, arXiv 2206.00364, Table 7 / App. F.2; after
Dhariwal & Nichol 2021, arXiv 2105.05233) in Flax, parameter-for-parameter the network of EDM's
`training/networks.py`, so that EDM checkpoints convert (`convert_state_dict`) and export back
(`to_state_dict`).

F(x_in; c_noise, labels) -> [B, H, W, out_channels], with c_noise EDM's noise label (ln(sigma) / 4
for the EDM preconditioning, eq. 7). Layout for an image of resolution R (square, NHWC):

    mapping  emb = silu(map_layer1(silu(map_layer0(PosEmb(c_noise) + map_augment(aug))))
                        + map_label(one_hot(labels)))          (map_augment, map_label: no bias)
    encoder  enc/RxR_conv (3x3); per level l (r = R / 2^l): enc/rxr_down (l > 0, a block that
             2x2-average-pools), then enc/rxr_block0..num_blocks-1; every encoder output is a skip
    decoder  lowest level: dec/rxr_in0 (attention), dec/rxr_in1; other levels: dec/rxr_up (a block
             that nearest-upsamples x2); then per level dec/rxr_block0..num_blocks, each on
             concat([x, skip.pop()]) along channels
    output   out_conv(silu(out_norm(x)))   (3x3)

Blocks are `edm_layers.UNetBlock` with EDM's defaults, DhariwalUNet's settings: adaptive scale
(silu(shift + norm1(h) * (scale + 1))), skip scale 1, resample filter [1, 1], a 1x1 skip
projection only where the channel count changes, num_heads = channels // channels_per_head (0
heads: no attention, as in EDM, where channels < 64), GroupNorm eps 1e-5. Initialisation: EDM's
kaiming_uniform * sqrt(1/3) (U(+-1/sqrt(fan_in)) for weights and biases), zeros for the last conv
of a block, attention proj, map_augment and out_conv, N(0, 1) for map_label.

Flax names nest EDM's (`edm_layers`): `enc.64x64_block0.conv0.weight` is
params['enc']['64x64_block0']['conv0']['kernel'].
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill.models.edm_layers import (Conv2d, GroupNorm, Init, Linear, Namespace, UNetBlock, abstract_params,
                                        check_inputs, convert_state_dict, decoder_blocks, encoder_blocks,
                                        positional_embedding, to_state_dict)

__all__ = ["DhariwalUNet", "init_shapes", "convert_state_dict", "to_state_dict"]

INIT = Init("kaiming_uniform", float(np.sqrt(1 / 3)), float(np.sqrt(1 / 3)))
INIT_ZERO = Init("kaiming_uniform", 0.0, 0.0)

init_shapes = abstract_params  # the module's parameter shapes (ShapeDtypeStructs), nothing allocated


def _encoder(net: "DhariwalUNet", x, emb, train):
    """EDM DhariwalUNet's `enc`: (features, skips)."""
    skips, res0 = [], x.shape[1]
    for level, mult in enumerate(net.channel_mult):
        res = res0 >> level
        if level == 0:
            x = Conv2d(net.model_channels * mult, 3, init_spec=INIT, dtype=net.dtype, name=f"{res}x{res}_conv")(x)
        else:
            x = UNetBlock(x.shape[-1], down=True, name=f"{res}x{res}_down", **net.block_kwargs())(x, emb, train)
        skips.append(x)
        x = encoder_blocks(net, x, skips, emb, train, mult)
    return x, skips


def _decoder(net: "DhariwalUNet", x, skips, emb, train):
    """EDM DhariwalUNet's `dec` (before out_norm, out_conv)."""
    levels = len(net.channel_mult)
    for level, mult in reversed(list(enumerate(net.channel_mult))):
        x = decoder_blocks(net, x, skips, emb, train, mult, lowest=level == levels - 1, attention_last_only=False)
    return x


class DhariwalUNet(nn.Module):
    """EDM's ADM network; defaults are EDM's ImageNet-64 configuration (with `num_classes=1000`).

    `__call__(x_in [B, H, W, C], c_noise [B], labels int [B] | None, features, train,
    augment_labels [B, augment_dim] | None)`: F [B, H, W, out_channels] float32; with
    `features=True` also the encoder's last activations [B, H / 2^(L-1), W / 2^(L-1),
    model_channels * channel_mult[-1]] (float32). H must equal W and be divisible by 2^(L-1).
    Labels are required when `num_classes > 0` and ignored otherwise; class indices are one-hot
    encoded (float vectors [B, num_classes] are taken as they are) and mapped by `map_label` (EDM's
    bias-free Linear). `augment_dim > 0` creates EDM's `map_augment`; augment labels default to
    zeros (no augmentation, as at inference). `channels_per_head` is EDM's UNetBlock argument
    (DhariwalUNet fixes it to 64; smaller values only for tests). Dropout (the 'dropout' rng) and
    label dropout act only with `train=True`.
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

    resample_filter = (1, 1)  # EDM's DhariwalUNet always resamples with [1, 1] (not a field)

    def block_kwargs(self) -> dict:
        """EDM DhariwalUNet's `block_kwargs` of its UNetBlocks (EDM's UNetBlock defaults otherwise)."""
        return dict(channels_per_head=self.channels_per_head, dropout=self.dropout, init_spec=INIT,
                    init_zero=INIT_ZERO, dtype=self.dtype)

    @nn.compact
    def __call__(self, x_in: jax.Array, c_noise: jax.Array, labels: jax.Array | None = None,
                 features: bool = False, train: bool = False, augment_labels: jax.Array | None = None):
        c_noise, labels, augment_labels = check_inputs(self, x_in, c_noise, labels, augment_labels, train)
        mc = self.model_channels
        emb_channels = mc * self.channel_mult_emb

        # Mapping (float32).
        emb = positional_embedding(c_noise, mc)
        if augment_labels is not None:
            emb = emb + Linear(mc, use_bias=False, init_spec=INIT_ZERO, name="map_augment")(augment_labels)
        emb = nn.silu(Linear(emb_channels, init_spec=INIT, name="map_layer0")(emb))
        emb = Linear(emb_channels, init_spec=INIT, name="map_layer1")(emb)
        if labels is not None:
            label_init = Init("kaiming_normal", float(np.sqrt(self.num_classes)))
            emb = emb + Linear(emb_channels, use_bias=False, init_spec=label_init, name="map_label")(labels)
        emb = nn.silu(emb).astype(self.dtype)

        feats, skips = Namespace(name="enc")(_encoder, self, x_in.astype(self.dtype), emb, train)
        x = Namespace(name="dec")(_decoder, self, feats, skips, emb, train)
        x = nn.silu(GroupNorm(dtype=self.dtype, name="out_norm")(x))
        out = Conv2d(self.out_channels, 3, init_spec=INIT_ZERO, dtype=self.dtype, name="out_conv")(x)
        out = out.astype(jnp.float32)
        return (out, feats.astype(jnp.float32)) if features else out
