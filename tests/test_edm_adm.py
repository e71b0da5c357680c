"""EDM's DhariwalUNet (ADM) in Flax against EDM's own network: parameter counts of the published
ImageNet-64 configuration and outputs of small random networks, from committed fixtures
(`tests/fixtures/make_edm_adm_fixtures.py` regenerates them with EDM's source and PyTorch)."""
from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.models import param_count
from fdistill.models.edm_adm import DhariwalUNet, convert_state_dict, init_shapes, to_state_dict
from fdistill.models.edm_layers import num_groups

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "edm")
with open(os.path.join(FIXTURES, "adm_param_counts.json")) as _f:
    RECORD = json.load(_f)

_FIELDS = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout",
           "label_dropout", "augment_dim", "channels_per_head")


def flax_module(config: dict, **overrides) -> tuple[DhariwalUNet, tuple[int, int, int]]:
    """The Flax module and per-example image shape for EDM DhariwalUNet kwargs `config`."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in _FIELDS}
    kw.update(overrides)
    module = DhariwalUNet(out_channels=config["out_channels"], num_classes=config.get("label_dim", 0), **kw)
    return module, (config["img_resolution"], config["img_resolution"], config["in_channels"])


def load_fixture(name: str):
    """(EDM state_dict {name: float32 array}, the other arrays) from adm_<name>.npz."""
    with np.load(os.path.join(FIXTURES, f"adm_{name}.npz")) as z:
        data = {k: z[k] for k in z.files}
    sd = {}
    for i, pname in enumerate(data["param_names"]):
        q = data["param_q"][data["param_offsets"][i]:data["param_offsets"][i + 1]]
        shape = tuple(data["param_shapes"][i, :data["param_ndims"][i]])
        sd[pname.decode()] = q.astype(np.float32).reshape(shape) * data["param_scales"][i]
    return sd, data


_SETUPS: dict = {}


def _parity_setup(name: str):
    """(module, image_shape, EDM state_dict, converted params, fixture arrays, jitted apply), cached."""
    if name not in _SETUPS:
        config = RECORD["parity_fixtures"][name]
        module, image_shape = flax_module(config)
        sd, data = load_fixture(name)
        params = convert_state_dict(sd, module, image_shape)
        apply = jax.jit(lambda p, x, c, lab, aug: module.apply({"params": p}, x, c, lab, features=True,
                                                               augment_labels=aug))
        _SETUPS[name] = module, image_shape, sd, params, data, apply
    return _SETUPS[name]


@pytest.mark.parametrize("name", ["uncond", "cond"])
def test_parity_with_edm(name):
    module, image_shape, sd, params, data, apply = _parity_setup(name)
    assert param_count(params) == RECORD["parity_fixtures"][name]["params"] == sum(v.size for v in sd.values())
    labels = jnp.asarray(data["labels"]) if "labels" in data else None
    out, feats = apply(params, data["x"], data["c_noise"], labels, None)
    assert out.dtype == jnp.float32 and out.shape == data["out"].shape
    err = float(np.max(np.abs(np.asarray(out) - data["out"])))
    assert err <= 1e-4, err
    assert np.abs(data["out"]).max() > 0.5  # non-degenerate reference
    # features=True: the encoder's last activations, lowest resolution.
    res = image_shape[0] >> (len(module.channel_mult) - 1)
    chex.assert_shape(feats, (data["x"].shape[0], res, res, module.model_channels * module.channel_mult[-1]))
    assert feats.dtype == jnp.float32
    if "augment_labels" in data:
        out_aug, _ = apply(params, data["x"], data["c_noise"], labels, jnp.asarray(data["augment_labels"]))
        err = float(np.max(np.abs(np.asarray(out_aug) - data["out_augment"])))
        assert err <= 1e-4, err
        assert np.abs(data["out_augment"] - data["out"]).max() > 1e-2  # augment labels matter


def _tiny(**kw) -> tuple[DhariwalUNet, dict]:
    """A tiny network and random non-zero params from its shapes (compiling `init`'s random
    initialisers costs far more on CPU than the network itself)."""
    kw = {"channel_mult": (1, 2), **kw}
    module = DhariwalUNet(out_channels=3, model_channels=8, num_blocks=1, attn_resolutions=(4,),
                          channels_per_head=4, **kw)
    shapes = init_shapes(module, (8, 8, 3))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)
    return module, params


def test_label_handling():
    x, c = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([-1.0, 0.5])
    uncond, params = _tiny()
    f = jax.jit(lambda lab: uncond.apply({"params": params}, x, c, lab))
    np.testing.assert_array_equal(np.asarray(f(jnp.array([3, 1]))), np.asarray(f(None)))  # labels ignored

    module, _, _, cparams, cdata, _ = _parity_setup("cond")
    with pytest.raises(ValueError, match="class-conditional"):
        module.apply({"params": cparams}, cdata["x"], cdata["c_noise"])
    with pytest.raises(ValueError, match="labels"):
        module.apply({"params": cparams}, cdata["x"], cdata["c_noise"], jnp.zeros((3, 1), jnp.int32))


def test_train_mode_dropout():
    x, c = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([-1.0, 0.5])
    module, params = _tiny(num_classes=4, label_dropout=1.0, dropout=0.3, channel_mult=(1,))
    f = jax.jit(lambda lab, train, key: module.apply({"params": params}, x, c, lab, train=train,
                                                     rngs={"dropout": key}), static_argnums=1)
    lab_a, lab_b = jnp.array([0, 1]), jnp.array([2, 3])
    ev_a, ev_b = f(lab_a, False, jax.random.key(3)), f(lab_b, False, jax.random.key(4))
    assert np.abs(np.asarray(ev_a) - np.asarray(ev_b)).max() > 1e-3  # labels used in eval
    np.testing.assert_array_equal(np.asarray(ev_a), np.asarray(f(lab_a, False, jax.random.key(5))))  # deterministic
    tr_a, tr_b = f(lab_a, True, jax.random.key(3)), f(lab_b, True, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(tr_a), np.asarray(tr_b))  # label_dropout 1: every label dropped
    assert np.abs(np.asarray(tr_a) - np.asarray(f(lab_a, True, jax.random.key(6)))).max() > 1e-3  # dropout rng


@pytest.mark.parametrize("name", sorted(RECORD["configs"]))
def test_param_count_equals_edm(name):
    """Fresh Flax init (shapes only) has exactly EDM's parameter count; includes the published
    ImageNet-64 ADM (295,899,267)."""
    config = RECORD["configs"][name]
    module, image_shape = flax_module(config)
    assert param_count(init_shapes(module, image_shape)) == config["params"]


def test_published_config_defaults():
    config = RECORD["configs"]["imagenet64_cond"]
    assert config["params"] == 295_899_267
    module = DhariwalUNet(out_channels=3, num_classes=1000)  # the defaults are EDM's
    assert param_count(init_shapes(module, (64, 64, 3))) == config["params"]


def test_groupnorm_groups_match_edm():
    for channels, groups in RECORD["groupnorm_groups"].items():
        assert num_groups(int(channels)) == groups


def test_bad_shapes_raise():
    module = DhariwalUNet(out_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    c = jnp.zeros((2,))
    for x, match in [(jnp.zeros((2, 8, 8)), r"\[B, H, W, C\]"), (jnp.zeros((2, 8, 4, 3)), "square"),
                     (jnp.zeros((2, 7, 7, 3)), "divisible")]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(module.init, jax.random.key(0), x, c)
    with pytest.raises(ValueError, match="c_noise"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 1)))
    aug = DhariwalUNet(out_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1, augment_dim=9)
    with pytest.raises(ValueError, match="augment_labels"):
        jax.eval_shape(lambda k: aug.init(k, jnp.zeros((2, 8, 8, 3)), c, augment_labels=jnp.zeros((2, 4))),
                       jax.random.key(0))


def test_convert_state_dict_reports_mismatches():
    module, image_shape, sd, _, _, _ = _parity_setup("cond")
    bad = dict(sd)
    del bad["enc.8x8_block0.conv0.weight"]
    bad["enc.8x8_block0.extra.weight"] = np.zeros(3, np.float32)
    bad["map_layer0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError) as e:
        convert_state_dict(bad, module, image_shape)
    msg = str(e.value)
    for part in ("missing (1): enc.8x8_block0.conv0.weight", "unexpected (1): enc.8x8_block0.extra.weight",
                 "mis-shaped (1): map_layer0.bias"):
        assert part in msg, msg
    # EDM's resample_filter buffers and a `model.` prefix (EDMPrecond's state_dict) are accepted.
    ok = {f"model.{k}": v for k, v in sd.items()}
    ok["model.enc.4x4_down.conv0.resample_filter"] = np.full((1, 1, 2, 2), 0.25, np.float32)
    convert_state_dict(ok, module, image_shape)
    ok["model.enc.4x4_down.conv0.resample_filter"] = np.full((1, 1, 4, 4), 1 / 16, np.float32)
    with pytest.raises(ValueError, match="resample filter"):
        convert_state_dict(ok, module, image_shape)


def test_to_state_dict_inverts_the_converter():
    module, image_shape, sd, params, _, _ = _parity_setup("cond")
    assert {"conv0", "affine", "norm1", "conv1"} <= set(params["enc"]["8x8_block0"])  # EDM's names, nested
    back = to_state_dict(params, module, image_shape)
    buffers = {k for k in back if k.endswith(".resample_filter")}
    assert buffers and set(back) == set(sd) | buffers  # EDM's resample_filter buffers come along
    for name, value in sd.items():
        np.testing.assert_array_equal(back[name], value)
    chex.assert_trees_all_equal(convert_state_dict(back, module, image_shape), params)
