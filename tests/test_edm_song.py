"""EDM's SongUNet (DDPM++ / NCSN++) in Flax against EDM's PyTorch networks, through the committed
fixtures of `tests/fixtures/make_edm_fixtures.py` (no PyTorch here): outputs of small random
networks to <= 1e-4, the parameter counts of the published CIFAR-10 networks to the parameter, the
converter's errors, features, labels, dropout and bad input."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdistill import models
from fdistill.denoiser import Denoiser
from fdistill.models import edm_song
from fdistill.models.edm_song import EDM_CIFAR10, SongUNet, convert_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "edm")
SMALL = sorted(f[:-4] for f in os.listdir(FIXTURES) if f.startswith("song_") and f.endswith(".npz"))
FIELDS = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout",
          "augment_dim", "embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter")
TINY = dict(out_channels=3, model_channels=8, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
            attn_resolutions=(8,))


def load_fixture(name):
    """(SongUNet, EDM state_dict, arrays, EDM config) of one fixture."""
    d = dict(np.load(os.path.join(FIXTURES, name + ".npz")))
    cfg = json.loads(d["config"].tobytes())
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in FIELDS}
    net = SongUNet(out_channels=cfg["out_channels"], num_classes=cfg["label_dim"], **kw)
    sd, offset = {}, 0
    for key, shape in json.loads(d["state_dict_index"].tobytes()):
        n = int(np.prod(shape))
        sd[key] = d["state_dict"][offset:offset + n].reshape(shape)
        offset += n
    assert offset == d["state_dict"].size
    return net, sd, d, cfg


def rand_params(net, image_shape, seed=0, scale=0.2):
    """Random non-zero params of `net` from its abstract tree (a compiled `init` costs ~10 s of XLA
    compile on CPU for the random initialisers alone)."""
    shapes = edm_song.abstract_params(net, image_shape)
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32)
                                        for s in leaves])


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def test_fixtures_present():
    assert len(SMALL) >= 4, SMALL


@pytest.mark.parametrize("name", SMALL)
def test_parity_with_edm(name):
    net, sd, d, cfg = load_fixture(name)
    x = nhwc(d["x"])
    params = convert_state_dict(sd, net, x.shape[1:])
    labels = jnp.asarray(d["class_labels"]) if cfg["label_dim"] else None
    kw = {"labels": labels} if labels is not None else {}
    aug = jnp.asarray(d["augment_labels"]) if cfg.get("augment_dim") else None

    @jax.jit
    def run(params, x, c_noise, sigma, kw, aug):
        out = net.apply({"params": params}, x, c_noise, **kw)
        out_aug = net.apply({"params": params}, x, c_noise, augment_labels=aug, **kw) if aug is not None else None
        # EDMPrecond's D(x; sigma) = the repository's Denoiser around the converted network.
        denoised = Denoiser(net, sigma_data=0.5)(params, x, sigma, **kw)
        return out, out_aug, denoised

    out, out_aug, denoised = run(params, x, d["c_noise"], d["sigma"], kw, aug)
    chex.assert_shape(out, x.shape)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), nhwc(d["out"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(denoised), nhwc(d["denoised"]), atol=1e-4, rtol=0)
    if aug is not None:
        np.testing.assert_allclose(np.asarray(out_aug), nhwc(d["out_aug"]), atol=1e-4, rtol=0)
        assert np.abs(np.asarray(out_aug) - np.asarray(out)).max() > 1e-2  # the augment path matters


@pytest.mark.parametrize("key", ["cifar10_ddpmpp_cond", "cifar10_ddpmpp_uncond", "cifar10_ncsnpp_cond",
                                 "cifar10_ncsnpp_uncond"])
def test_parameter_counts_equal_edm(key):
    with open(os.path.join(FIXTURES, "param_counts.json")) as f:
        expected = json.load(f)[key]
    _, arch, cond = key.split("_")
    net = SongUNet(out_channels=3, num_classes=10 if cond == "cond" else 0, augment_dim=9, dropout=0.13,
                   **EDM_CIFAR10[arch])
    shapes = edm_song.abstract_params(net, (32, 32, 3))
    assert edm_song.param_count(shapes) == expected
    # The only extra leaf is NCSN++'s Fourier frequencies (an EDM buffer): 128 of them.
    extra = 128 if arch == "ncsnpp" else 0
    assert models.param_count(shapes) == expected + extra
    if extra:
        assert shapes["map_noise"]["freqs"].shape == (128,)


def test_features_and_shapes():
    net = SongUNet(**TINY)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    c = jnp.array([-1.0, 0.5])
    params = rand_params(net, (8, 8, 3))

    @jax.jit
    def run(params, x, c):
        return net.apply({"params": params}, x, c, features=True), net.apply({"params": params}, x, c)

    (out, feats), plain = run(params, x, c)
    chex.assert_shape(out, (2, 8, 8, 3))
    chex.assert_shape(feats, (2, 4, 4, 16))
    assert out.dtype == jnp.float32 and feats.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    # EDM names in the Flax tree.
    assert set(params["enc"]) == {"8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"}
    assert {"norm2", "qkv", "proj"} <= set(params["enc"]["8x8_block0"])
    assert set(params["dec"]) == {"4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "8x8_up", "8x8_block0",
                                  "8x8_block1", "8x8_aux_norm", "8x8_aux_conv"}
    assert "qkv" in params["dec"]["8x8_block1"] and "qkv" not in params["dec"]["8x8_block0"]
    # A larger image with the same fields: attention only at the listed resolution (8), in0 at the lowest.
    big = edm_song.abstract_params(net, (16, 16, 3))
    assert "qkv" not in big["enc"]["16x16_block0"] and "qkv" in big["enc"]["8x8_block0"]
    assert "qkv" in big["dec"]["8x8_in0"]


def test_unconditional_ignores_labels_conditional_requires_them():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    c = jnp.zeros((2,))
    net = SongUNet(**TINY)
    with pytest.raises(ValueError, match="class-conditional"):
        jax.eval_shape(SongUNet(num_classes=10, **TINY).init, jax.random.key(1), x, c)
    cond = SongUNet(num_classes=10, **TINY)

    @jax.jit
    def run(params, cparams):
        a = net.apply({"params": params}, x, c)
        b = net.apply({"params": params}, x, c, jnp.array([3, 7]))
        out0 = cond.apply({"params": cparams}, x, c, jnp.array([0, 1]))
        out1 = cond.apply({"params": cparams}, x, c, jnp.array([2, 1]))
        out_onehot = cond.apply({"params": cparams}, x, c, jax.nn.one_hot(jnp.array([0, 1]), 10))
        return a, b, out0, out1, out_onehot

    a, b, out0, out1, out_onehot = run(rand_params(net, (8, 8, 3)), rand_params(cond, (8, 8, 3)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(out0 - out1))[0].max() > 1e-4
    np.testing.assert_array_equal(np.asarray(out0 - out1)[1], 0.0)
    np.testing.assert_allclose(np.asarray(out_onehot), np.asarray(out0), atol=1e-6)
    shapes = edm_song.abstract_params(cond, (8, 8, 3))
    with pytest.raises(ValueError, match="labels must be"):
        jax.eval_shape(lambda p: cond.apply({"params": p}, x, c, jnp.array([0, 1, 2])), shapes)


def test_dropout_label_dropout_and_frozen_frequencies():
    net = SongUNet(num_classes=10, label_dropout=0.5, embedding_type="fourier", channel_mult_noise=2,
                   resample_filter=(1, 3, 3, 1), encoder_type="residual", **TINY)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    c, labels = jnp.linspace(-1, 1, 4), jnp.arange(4)

    @jax.jit
    def run(p):
        eval_out = net.apply({"params": p}, x, c, labels)
        train_out = net.apply({"params": p}, x, c, labels, train=True, rngs={"dropout": jax.random.key(2)})
        def loss(freqs, kernel):  # gradients through the embedding only (cheaper to compile)
            q = {**p, "map_noise": {"freqs": freqs}, "map_layer0": {**p["map_layer0"], "kernel": kernel}}
            return jnp.sum(net.apply({"params": q}, x, c, labels) ** 2)

        grads = jax.grad(loss, argnums=(0, 1))(p["map_noise"]["freqs"], p["map_layer0"]["kernel"])
        return eval_out, train_out, grads

    eval_out, train_out, grads = run(rand_params(net, (8, 8, 3)))
    # A fresh init draws the Fourier frequencies from N(0, 16^2), like EDM's randn * 16.
    freqs = edm_song.FourierEmbedding(512).init(jax.random.key(1), jnp.zeros((1,)))["params"]["freqs"]
    assert freqs.shape == (256,) and 14.0 < float(jnp.std(freqs)) < 18.0
    assert np.abs(np.asarray(train_out - eval_out)).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(grads[0]), 0.0)  # EDM's buffer: never trained
    assert float(jnp.abs(grads[1]).max()) > 0
    shapes = edm_song.abstract_params(net, (8, 8, 3))
    with pytest.raises(Exception):  # training mode needs the 'dropout' rng
        jax.eval_shape(lambda p: net.apply({"params": p}, x, c, labels, train=True), shapes)


def test_bfloat16_activations():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    c = jnp.zeros((2,))
    net, net16 = SongUNet(**TINY), SongUNet(dtype=jnp.bfloat16, **TINY)

    @jax.jit
    def run(params):
        return net.apply({"params": params}, x, c), net16.apply({"params": params}, x, c, features=True)

    params = rand_params(net, (8, 8, 3))
    out32, (out16, feats) = run(params)
    assert out16.dtype == jnp.float32 and feats.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=0.1 * float(jnp.abs(out32).max()) + 1e-2)


def test_bad_shapes_and_fields():
    net = SongUNet(**TINY)
    c = jnp.zeros((1,))
    init = lambda net, x, c, **kw: jax.eval_shape(  # noqa: E731  (errors come at trace time)
        lambda k: net.init(k, jnp.zeros(x), jnp.zeros(c), **kw), jax.random.key(0))
    with pytest.raises(ValueError, match="not divisible"):
        init(net, (1, 7, 7, 3), (1,))
    with pytest.raises(ValueError, match="square"):
        init(net, (1, 8, 16, 3), (1,))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        init(net, (8, 8, 3), (1,))
    with pytest.raises(ValueError, match="c_noise"):
        init(net, (1, 8, 8, 3), (2,))
    with pytest.raises(ValueError, match="embedding_type"):
        init(SongUNet(**TINY, embedding_type="sinusoidal"), (1, 8, 8, 3), (1,))
    with pytest.raises(ValueError, match="GroupNorm"):
        init(SongUNet(**dict(TINY, model_channels=6)), (1, 8, 8, 3), (1,))
    with pytest.raises(ValueError, match="augment_dim"):
        init(net, (1, 8, 8, 3), (1,), augment_labels=jnp.zeros((1, 9)))
    with pytest.raises(ValueError, match="augment_labels must have shape"):
        init(SongUNet(**TINY, augment_dim=9), (1, 8, 8, 3), (1,), augment_labels=jnp.zeros((1, 3)))
    del c


def test_converter_reports_mismatches():
    net, sd, d, cfg = load_fixture("song_ncsnpp_cond_aug")
    shape = nhwc(d["x"]).shape[1:]
    bad = dict(sd)
    del bad["enc.8x8_block0.conv0.weight"]
    bad["enc.8x8_block0.extra.weight"] = np.zeros((3,), np.float32)
    bad["dec.8x8_aux_conv.bias"] = np.zeros((4,), np.float32)
    with pytest.raises(ValueError) as err:
        convert_state_dict(bad, net, shape)
    msg = str(err.value)
    assert "missing (1): enc.8x8_block0.conv0.weight" in msg
    assert "unexpected (1): enc.8x8_block0.extra.weight" in msg
    assert "mis-shaped (1): dec.8x8_aux_conv.bias" in msg
    # A resample_filter buffer that is not the module's filter.
    other = SongUNet(**{**{f: getattr(net, f) for f in FIELDS}, "resample_filter": (1, 1)},
                     out_channels=3, num_classes=10)
    with pytest.raises(ValueError, match="resample_filter differing"):
        convert_state_dict(sd, other, shape)
    # The 'model.' prefix of EDMPrecond's state_dict is accepted.
    p1 = convert_state_dict({"model." + k: v for k, v in sd.items()}, net, (1,) + shape)
    chex.assert_trees_all_equal(p1, convert_state_dict(sd, net, shape))


def test_registry_builds_song_unet_from_a_config():
    cfg = ml_collections.ConfigDict(dict(name="edm_ncsnpp", parametrisation="edm", model_channels=8,
                                         channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                                         attn_resolutions=[8], embedding_type="fourier", channel_mult_noise=2,
                                         encoder_type="residual", resample_filter=[1, 3, 3, 1]))
    net = models.build(cfg, (8, 8, 3))
    assert isinstance(net, SongUNet) and net.channel_mult == (1, 2) and net.resample_filter == (1, 3, 3, 1)
    shapes = edm_song.abstract_params(net, (8, 8, 3))
    out = jax.eval_shape(lambda p: net.apply({"params": p}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,))), shapes)
    assert out.shape == (1, 8, 8, 3) and out.dtype == jnp.float32
