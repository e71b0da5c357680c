"""The FID Inception-v3 in Flax: the 2015-12-05 TensorFlow graph as pytorch-fid ports it.

Heusel et al. 2017 (arXiv 1706.08500) define FID on the 2048-d pool features of this network. This
is a port of pytorch-fid's `InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True,
use_fid_inception=True)` (`pytorch_fid/inception.py`): images in [0, 1] are resized to 299x299 by
bilinear interpolation with PyTorch's `align_corners=False` rule and **no antialiasing** (also when
downsampling), mapped to [-1, 1], and run through torchvision's Inception3 layout with the FID
variants of the mixed blocks (`FIDInceptionA/C/E_1`: 3x3 average pools that exclude the padding;
`FIDInceptionE_2`: a 3x3 max pool), BatchNorm eps 0.001, ending in the global average pool.
Layout is NHWC; convolutions run at `Precision.HIGHEST` so GPUs/TPUs do not drop to TF32/bf16.

Weights: the standard file is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (see
`WEIGHTS_URL`); it is never downloaded here. `load_weights(path)` reads it *without PyTorch* (via
`fdistill.evaluation.torch_zip`), or an `.npz` holding the same state-dict names, and returns Flax
variables `{'params', 'batch_stats'}`. EDM's / StyleGAN's `inception-2015-12-05.pkl` holds the same
TF weights but as a pickled TorchScript module (with its own TF-style resize on uint8 inputs); it
needs PyTorch and is not supported.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import zipfile
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fdistill.evaluation import torch_zip

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier (unused for FID); torchvision's ImageNet model has 1000

_HIGHEST = jax.lax.Precision.HIGHEST
WEIGHTS_HELP = (f"The standard FID Inception weights are pytorch-fid's {WEIGHTS_NAME}, released at "
                f"{WEIGHTS_URL} (download it on a machine with internet access; nothing is downloaded here) "
                "and pass its path as config.eval.inception_weights=FILE. An .npz with the same state-dict "
                "names works too. EDM/StyleGAN's inception-2015-12-05.pkl is the same network, but a "
                "TorchScript pickle that needs PyTorch: it is not supported.")


# --------------------------------------------------------------------------------------------------
# The network (names follow torchvision's state dict, so weights map one to one)
# --------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU."""
    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)), use_bias=False,
                    precision=_HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool3(x):
    """3x3, stride 1, padding 1, padded cells not counted (`count_include_pad=False`)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x, stride: int = 1, pad: int = 1):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):  # FIDInceptionA
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):  # FIDInceptionC
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):  # FIDInceptionE_1 (avg pool) / FIDInceptionE_2 (max pool)
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool3(x) if self.max_pool else _avg_pool3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """[B, H, W, 3] in [-1, 1] (299x299 for the standard features) -> [B, 2048] pool features."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool3(x, 2, 0)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool3(x, 2, 0)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(False, name="Mixed_7b")(x)
        x = InceptionE(True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------------------------------
# Resize and normalisation exactly as pytorch-fid
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation weights of PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`
    along one axis (no antialiasing): src = max(0, (dst + 0.5) * in/out - 0.5), the two neighbours
    floor(src) and min(floor(src) + 1, in - 1) weighted by 1 - frac and frac (PyTorch's
    `area_pixel_compute_source_index` and `upsample_bilinear2d`)."""
    f32 = np.float32  # PyTorch computes the source index in float32 for float32 images; so do we
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0.astype(f32)).astype(np.float64)
    w = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(w, (rows, i0), 1.0 - frac)
    np.add.at(w, (rows, i1), frac)
    return w.astype(np.float32)


def resize_bilinear(images, size: tuple[int, int]):
    """[B, H, W, C] -> [B, h, w, C] like PyTorch's bilinear `align_corners=False` (no antialiasing).

    `jax.image.resize(..., 'bilinear')` antialiases when downsampling (PyTorch does not), so the
    interpolation is written out as two small matrix products instead."""
    _, h_in, w_in, _ = images.shape
    if (h_in, w_in) == tuple(size):
        return images
    wh = jnp.asarray(bilinear_matrix(h_in, size[0]))
    ww = jnp.asarray(bilinear_matrix(w_in, size[1]))
    x = jnp.einsum("oh,bhwc->bowc", wh, images, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", ww, x, precision=_HIGHEST)


@jax.jit
def preprocess(images):
    """Images [B, H, W, 3] in [0, 1] -> the network's input [B, 299, 299, 3] in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (NHWC, RGB) in [0, 1], got shape {images.shape}")
    x = resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


@jax.jit
def pool_features(variables, x):
    """The network on preprocessed input [B, 299, 299, 3] in [-1, 1] -> [B, 2048] float32."""
    return FIDInceptionV3().apply(variables, x)


def features(variables, images):
    """2048-d FID pool features [B, 2048] float32 of images [B, H, W, 3] float in [0, 1] (any H, W).

    Two jitted stages (resize+normalise per input size, the network once per batch size)."""
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype} (divide uint8 images by 255)")
    return pool_features(variables, preprocess(images))


# --------------------------------------------------------------------------------------------------
# Weights: pytorch-fid state dict (.pth, read without PyTorch) or .npz with the same names
# --------------------------------------------------------------------------------------------------

def _flax_to_torch_name(path: tuple[str, ...]) -> str:
    collection, *mods, leaf = path
    torch_leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                  ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[(collection, leaf)]
    return ".".join(mods + [torch_leaf])


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened Flax variable path -> shape, from `jax.eval_shape` (no arrays allocated)."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes).items()}


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state-dict names this port uses -> their PyTorch shapes (conv OIHW)."""
    out = {}
    for path, shape in variable_shapes().items():
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[_flax_to_torch_name(path)] = shape
    return out


_IGNORED = re.compile(r"(.*\.num_batches_tracked|fc\.weight|fc\.bias)$")


def variables_from_state_dict(state_dict: dict[str, Any], source: str = "state dict") -> dict:
    """Flax variables {'params', 'batch_stats'} from pytorch-fid's Inception state dict (NumPy arrays).

    Requires every tensor of the network with its shape; ignores `*.num_batches_tracked` and the
    unused classifier `fc.*`; rejects anything else (e.g. torchvision's ImageNet Inception with
    `AuxLogits.*` and a 1000-class `fc`, which has the same layer names but other weights)."""
    sd = {str(k): np.asarray(v) for k, v in state_dict.items()}
    expected = state_dict_shapes()
    fc = sd.get("fc.weight")
    if fc is not None and fc.shape[0] != NUM_CLASSES:
        raise ValueError(f"{source}: fc.weight has {fc.shape[0]} classes, the FID Inception has {NUM_CLASSES}: "
                         f"this is not the FID Inception (torchvision's ImageNet Inception?). {WEIGHTS_HELP}")
    unexpected = sorted(k for k in sd if k not in expected and not _IGNORED.match(k))
    missing = sorted(k for k in expected if k not in sd)
    if unexpected or missing:
        raise ValueError(f"{source}: not the FID Inception-v3 state dict: missing {len(missing)} tensors "
                         f"{missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}. {WEIGHTS_HELP}")
    flat = {}
    for path, shape in variable_shapes().items():
        name = _flax_to_torch_name(path)
        value = sd[name]
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, expected {expected[name]}")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{source}: {name} has dtype {value.dtype}, expected floating point")
        value = value.astype(np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        flat[path] = value
    return unflatten_dict(flat)


def _check_hash(path: str) -> None:
    """A file named like torch hub's `<name>-<sha256 prefix>.pth` must match its hash prefix."""
    m = re.fullmatch(r"pt_inception-2015-12-05-([0-9a-f]{8})\.pth", os.path.basename(path))
    if not m:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise ValueError(f"{path}: sha256 {h.hexdigest()[:8]}... does not match the {m.group(1)} in its name: "
                         f"a truncated or corrupt download? {WEIGHTS_HELP}")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> array from pytorch-fid's `.pth` (zip or legacy torch.save, read without PyTorch) or `.npz`."""
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(f"no Inception weights file given. {WEIGHTS_HELP}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path!r}. {WEIGHTS_HELP}")
    if path.endswith(".pkl"):
        raise ValueError(f"{path}: .pkl Inception files (EDM/StyleGAN's TorchScript detector) are not supported. "
                         f"{WEIGHTS_HELP}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_npz = any(n.endswith(".npy") for n in zf.namelist())
        if is_npz:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    _check_hash(path)
    try:
        obj = torch_zip.load(path)
    except torch_zip.TorchFileError as e:
        raise ValueError(f"{path}: cannot read as a PyTorch state dict ({e}). {WEIGHTS_HELP}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict. {WEIGHTS_HELP}")
    return obj


def load_weights(path: str | os.PathLike) -> dict:
    """Flax variables {'params', 'batch_stats'} of the FID Inception from `path` (.pth or .npz)."""
    return jax.tree.map(jnp.asarray, variables_from_state_dict(load_state_dict(path), source=os.fspath(path)))


class InceptionFeatures:
    """FID features of image batches, chunked with a fixed batch size (one compilation).

    `InceptionFeatures.from_path(FILE)(images)`: images [n, H, W, 3] (or [n, H, W, 1], repeated to RGB)
    float in [0, 1] -> np.ndarray [n, 2048] float32."""

    def __init__(self, variables, batch_size: int = 64):
        self.variables = variables
        self.batch_size = int(batch_size)

    @classmethod
    def from_path(cls, path: str | os.PathLike, batch_size: int = 64) -> "InceptionFeatures":
        return cls(load_weights(path), batch_size)

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [n, H, W, 3 or 1] in [0, 1], got shape {images.shape}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        n, bs = len(images), self.batch_size
        out = []
        for s in range(0, n, bs):
            chunk = images[s:s + bs]
            if len(chunk) < bs:  # pad the last chunk: same shapes, no recompilation
                chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),) + chunk.shape[1:], np.float32)])
            out.append(np.asarray(features(self.variables, chunk))[: min(bs, n - s)])
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


__all__: Sequence[str] = (
    "FIDInceptionV3", "InceptionFeatures", "WEIGHTS_URL", "bilinear_matrix", "features", "load_state_dict",
    "load_weights", "pool_features", "preprocess", "resize_bilinear", "state_dict_shapes",
    "variables_from_state_dict",
)
