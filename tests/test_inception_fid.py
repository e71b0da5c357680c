"""FID Inception-v3 (pytorch-fid port) parity on random weights, the torch-free .pth reader, FID closed forms,
reference-statistics files and the errors for missing/malformed weights.

Fixtures: tests/fixtures/inception/, written by tests/fixtures/make_inception_fixtures.py (pytorch-fid 0.3.0,
torch 2.14.1). The random state dict itself is not stored: `random_state_dict` regenerates it with NumPy.
"""
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest
import scipy.linalg

from fdistill.evaluation import fid, inception, torch_zip
from tests.fixtures import make_inception_fixtures as recipe

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "inception")


@pytest.fixture(scope="module")
def fixtures():
    with np.load(os.path.join(FIXTURES, "inception_fixtures.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def weights_npz(fixtures, tmp_path_factory):
    """The recorded random state dict (regenerated from its recipe) as an .npz weights file."""
    shapes = {k: tuple(v) for k, v in recipe.read_json_bytes(fixtures["state_dict_shapes"]).items()}
    path = str(tmp_path_factory.mktemp("inception") / "random_fid_inception.npz")
    np.savez(path, **recipe.random_state_dict(shapes))
    return path


@pytest.fixture(scope="module")
def extractor(weights_npz):
    return inception.InceptionFeatures.from_path(weights_npz, batch_size=4)


# ------------------------------------------------------------------------------------- the network

def test_state_dict_names_match_pytorch_fid(fixtures):
    recorded = recipe.read_json_bytes(fixtures["state_dict_shapes"])
    ours = inception.state_dict_shapes()
    used = {k: tuple(v) for k, v in recorded.items()
            if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert used == ours
    assert sum(int(np.prod(s)) for s in ours.values()) == 21_820_000


def test_resize_matches_torch_bilinear(fixtures):
    import jax.numpy as jnp

    for i, (in_hw, out_hw) in enumerate(recipe.RESIZE_CASES):
        got = np.asarray(inception.resize_bilinear(jnp.asarray(recipe.resize_input(in_hw, i)), out_hw))
        np.testing.assert_allclose(got, fixtures[f"resize_{i}"], atol=2e-6, rtol=0)


def test_features_match_pytorch_fid(fixtures, extractor):
    """2048-d pool features of pytorch-fid's InceptionV3 (resize + normalise + FID blocks) on random weights:
    32x32 (upsampled), 512x512 (downsampled, no antialiasing), 299x299 and 80x400 images."""
    ours, ref = [], []
    for group, (n, h, w) in recipe.IMAGE_GROUPS:
        got = extractor(recipe.fixture_images(n, h, w, group))
        want = fixtures[f"features_{group}"]
        assert got.shape == (n, 2048) and got.dtype == np.float32
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 1e-4, (group, rel)  # measured 2.6e-7 .. 4.8e-7 on CPU
        ours.append(got)
        ref.append(want)
    ours, ref = np.concatenate(ours), np.concatenate(ref)
    assert np.mean(ref == 0) < 0.5 and np.isfinite(ref).all()  # non-degenerate fixtures
    # The image-dependent part (features minus their mean over the 7 images) matches too.
    oc, rc = ours - ours.mean(0), ref - ref.mean(0)
    assert np.linalg.norm(oc - rc) / np.linalg.norm(rc) <= 1e-3  # measured 3.4e-6


def test_feature_fn_entry_point(extractor, weights_npz, monkeypatch):
    from fdistill.data import tfds_images

    monkeypatch.setitem(fid._configured, "path", "")
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    fid._extractor.cache_clear()
    x = recipe.fixture_images(2, 32, 32, "entry") * 2.0 - 1.0  # [-1, 1] like the data sources
    with pytest.raises(FileNotFoundError, match="config.eval.inception_weights"):
        fid.inception(x)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        fid.configure_inception("/nonexistent/pt_inception.pth")
    monkeypatch.setenv(fid.WEIGHTS_ENV, weights_npz)  # the environment variable works too ...
    assert fid.inception_weights_path() == weights_npz
    fid.configure_inception(weights_npz, batch_size=4)  # ... and configure_inception wins
    try:
        got = fid.inception(x)
        want = extractor(np.floor(x * 127.5 + 128) / 255)  # 8-bit rounding, as PNG samples
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        gray = fid.inception(x[..., :1])
        np.testing.assert_allclose(gray, fid.inception(np.repeat(x[..., :1], 3, -1)), rtol=1e-6, atol=1e-6)
        name, fn = tfds_images.resolve_feature_fn("fdistill.evaluation.fid:inception")
        assert (name, fn) == ("inception", fid.inception)
    finally:
        fid._extractor.cache_clear()


# ----------------------------------------------------------------------------- the torch-free reader

@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_torch_free_reader(name):
    got = torch_zip.load(os.path.join(FIXTURES, name))
    with np.load(os.path.join(FIXTURES, "tiny_expected.npz")) as z:
        want = {k: z[k] for k in z.files}
    assert isinstance(got, collections.OrderedDict) and sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert got["transposed"].shape == (6, 4) and got["half"].dtype == np.float16
    assert got._metadata[""] == {"version": 1}  # the state dict's attribute survives


def _zip_with_pickle(path, obj_bytes, extra=()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", obj_bytes)
        for name in extra:
            zf.writestr(name, b"")


def test_reader_refuses_other_globals(tmp_path):
    bad = str(tmp_path / "bad.pth")
    _zip_with_pickle(bad, pickle.dumps(collections.Counter(a=1)))
    with pytest.raises(torch_zip.TorchFileError, match="collections.Counter"):
        torch_zip.load(bad)
    legacy_bad = str(tmp_path / "legacy.pth")
    with open(legacy_bad, "wb") as f:
        f.write(pickle.dumps(12345))
    with pytest.raises(torch_zip.TorchFileError, match="magic"):
        torch_zip.load(legacy_bad)
    script = str(tmp_path / "script.pt")
    _zip_with_pickle(script, pickle.dumps({}), extra=("archive/constants.pkl", "archive/code/x.py"))
    with pytest.raises(torch_zip.TorchFileError, match="TorchScript"):
        torch_zip.load(script)


# ----------------------------------------------------------------------------------- weight errors

def test_missing_and_malformed_weights(tmp_path, weights_npz):
    missing = str(tmp_path / "nope" / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError) as e:
        inception.load_weights(missing)
    assert missing in str(e.value) and inception.WEIGHTS_URL in str(e.value)
    assert "config.eval.inception_weights" in str(e.value) and "not supported" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no Inception weights file given"):
        inception.load_weights("")

    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="TorchScript"):
        inception.load_weights(str(pkl))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="cannot read as a PyTorch state dict"):
        inception.load_weights(str(garbage))

    wrong_hash = tmp_path / "pt_inception-2015-12-05-00000000.pth"
    wrong_hash.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="truncated or corrupt download"):
        inception.load_weights(str(wrong_hash))

    sd = inception.load_state_dict(weights_npz)
    partial = dict(sd)
    del partial["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="missing 1 tensors.*Mixed_7c.branch_pool.conv.weight"):
        inception.variables_from_state_dict(partial)
    torchvision_like = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match="unexpected 1.*AuxLogits"):
        inception.variables_from_state_dict(torchvision_like)
    with pytest.raises(ValueError, match="1000 classes"):
        inception.variables_from_state_dict(dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)}))
    reshaped = dict(sd, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"Conv2d_1a_3x3.conv.weight has shape \(32, 3, 5, 5\)"):
        inception.variables_from_state_dict(reshaped)


# ----------------------------------------------------------------------------------------------- FID

def _pytorch_fid_formula(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm of S1 S2, real part)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((500, 64), (100, 256)):  # also n < d: singular covariance, as with few samples
        f = np.maximum(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d), 0.0).astype(np.float32)
        mu, sigma = fid.statistics(f)
        assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (d, d)
        assert fid.fid(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6 * np.trace(sigma))
        assert fid.fid_from_features(f, f.copy()) == pytest.approx(0.0, abs=1e-6 * np.trace(sigma))


def test_fid_closed_form_on_two_gaussians():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]  # commuting covariances in a rotated basis
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.fid(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    # General covariances: the same value as pytorch-fid's formula.
    g1, g2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    t1, t2 = g1 @ g1.T + 0.1 * np.eye(d), g2 @ g2.T + 0.1 * np.eye(d)
    assert fid.fid(mu1, t1, mu2, t2) == pytest.approx(_pytorch_fid_formula(mu1, t1, mu2, t2), rel=1e-9)
    # Samples of the two Gaussians: the plug-in FID approaches the closed form.
    x = rng.multivariate_normal(mu1, s1, 100_000)
    y = rng.multivariate_normal(mu2, s2, 100_000)
    assert fid.fid_from_features(x, y) == pytest.approx(closed, rel=0.02)


def test_statistics_npz_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = fid.statistics(rng.normal(size=(50, 8)))
    path = str(tmp_path / "ref_stats")  # no .npz suffix: written to exactly this name
    fid.save_statistics(path, mu, sigma)
    assert os.path.isfile(path)
    with np.load(path) as z:  # the pytorch-fid / EDM format
        assert sorted(z.files) == ["mu", "sigma"]
    mu2, sigma2 = fid.load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # pytorch-fid writes them with savez_compressed: read as well.
    comp = str(tmp_path / "compressed.npz")
    np.savez_compressed(comp, mu=mu.astype(np.float32), sigma=sigma)
    assert fid.load_statistics(comp)[0].dtype == np.float64

    with pytest.raises(FileNotFoundError, match="reference statistics not found"):
        fid.load_statistics(str(tmp_path / "missing.npz"))
    only_mu = str(tmp_path / "only_mu.npz")
    np.savez(only_mu, mu=mu, m=sigma)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['sigma'\]"):
        fid.load_statistics(only_mu)
    bad_shape = str(tmp_path / "bad_shape.npz")
    np.savez(bad_shape, mu=mu, sigma=sigma[:, :4])
    with pytest.raises(ValueError, match="need mu"):
        fid.load_statistics(bad_shape)
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(ValueError, match="not an .npz archive"):
        fid.load_statistics(str(not_npz))
    with pytest.raises(ValueError, match="need mu"):
        fid.save_statistics(str(tmp_path / "x.npz"), mu, sigma[:4])
