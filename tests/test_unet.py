"""The U-Net: shapes, bottleneck features, EDM preconditioning (against the formulas written here),
class conditioning, jit vs no-jit, bfloat16 compute, the registry and bad input."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdistill import models
from fdistill.models.unet import UNet
from fdistill.objectives.score import Denoiser

TINY = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, emb_dim=16)


def perturbed(params, scale=0.1, seed=1):
    """Random non-zero parameters (the zero-initialised output layers would hide F otherwise)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("shape,mult,attention", [((8, 8, 1), (1, 2), True), ((16, 16, 3), (1, 2, 2), False)])
def test_output_and_feature_shapes(shape, mult, attention):
    net = UNet(out_channels=shape[-1], channels=8, channel_mult=mult, num_res_blocks=1, attention=attention,
               emb_dim=16)
    x = jnp.ones((3,) + shape)
    c = jnp.zeros((3,))
    params = jax.jit(net.init)(jax.random.key(0), x, c)  # jitted: eager Flax compiles every op on its own
    out, feats = jax.jit(net.apply, static_argnames="features")(params, x, c, features=True)
    chex.assert_shape(out, (3,) + shape)
    down = 2 ** (len(mult) - 1)
    chex.assert_shape(feats, (3, shape[0] // down, shape[1] // down, 8 * mult[-1]))
    assert out.dtype == jnp.float32 and feats.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(net.apply)(params, x, c)))
    # The output conv starts at zero: a fresh denoiser is D(x; sigma) = c_skip x.
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("use_jit", [False, True])
def test_edm_preconditioning_matches_formulas(use_jit):
    sigma_data = 0.5
    net = UNet(out_channels=1, **TINY)
    d = Denoiser(net, sigma_data)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    sigma = np.array([0.002, 0.3, 2.0, 80.0], np.float32)
    params = perturbed(jax.jit(d.init)(jax.random.key(0), jnp.asarray(x[:1])))
    fn = jax.jit(d.__call__) if use_jit else d.__call__
    got = np.asarray(fn(params, jnp.asarray(x), jnp.asarray(sigma)))
    # EDM Table 1, by hand in float64.
    s = sigma.astype(np.float64)[:, None, None, None]
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / np.sqrt(s**2 + sigma_data**2)
    c_in = 1 / np.sqrt(s**2 + sigma_data**2)
    f = np.asarray(jax.jit(net.apply)({"params": params}, jnp.asarray(c_in * x, jnp.float32),
                             jnp.asarray(np.log(sigma) / 4, jnp.float32)), np.float64)
    assert np.abs(f).mean() > 1e-3  # the network output is not trivially zero
    np.testing.assert_allclose(got, c_skip * x + c_out * f, rtol=2e-4, atol=2e-5)
    # Fresh parameters: D = c_skip x exactly.
    fresh = jax.jit(d.init)(jax.random.key(0), jnp.asarray(x[:1]))
    np.testing.assert_allclose(np.asarray(fn(fresh, jnp.asarray(x), jnp.asarray(sigma))), c_skip * x, rtol=1e-6)


def test_class_conditioning():
    net = UNet(out_channels=1, num_classes=10, **TINY)
    x, c = jnp.ones((2, 8, 8, 1)), jnp.zeros((2,))
    params = perturbed(jax.jit(net.init)(jax.random.key(0), x, c, jnp.zeros((2,), jnp.int32)))
    apply = jax.jit(net.apply)
    a = apply(params, x, c, jnp.array([0, 0]))
    b = apply(params, x, c, jnp.array([0, 7]))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-6)
    assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-4
    with pytest.raises(ValueError, match="num_classes=10"):
        net.apply(params, x, c)
    # An unconditional net ignores labels.
    un = UNet(out_channels=1, **TINY)
    p = perturbed(jax.jit(un.init)(jax.random.key(0), x, c))
    np.testing.assert_array_equal(np.asarray(jax.jit(un.apply)(p, x, c)),
                                  np.asarray(jax.jit(un.apply)(p, x, c, jnp.array([1, 2]))))


def test_bfloat16_compute_is_close_to_float32():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
    c = jnp.array([-1.0, 0.5])
    net32 = UNet(out_channels=1, **TINY)
    params = perturbed(jax.jit(net32.init)(jax.random.key(0), x, c))
    out32 = jax.jit(net32.apply)(params, x, c)
    out16 = jax.jit(UNet(out_channels=1, dtype=jnp.bfloat16, **TINY).apply)(params, x, c)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05, rel


def test_registry_builds_from_config_and_rejects_bad_sizes():
    mc = ml_collections.ConfigDict(dict(name="unet", channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                        attention=True, num_heads=2, emb_dim=16, num_classes=0, dropout=0.0))
    net = models.build(mc, (8, 8, 1))
    assert isinstance(net, UNet) and net.out_channels == 1
    params = net.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), jnp.zeros((1,)))
    assert sum(p.size for p in jax.tree.leaves(params)) > 1000
    with pytest.raises(ValueError, match="channel_mult"):
        models.build(mc, (7, 7, 1)).init(jax.random.key(0), jnp.ones((1, 7, 7, 1)), jnp.zeros((1,)))
    mc.channels = 6
    with pytest.raises(ValueError, match="multiple of 4"):
        models.build(mc, (8, 8, 1)).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), jnp.zeros((1,)))
