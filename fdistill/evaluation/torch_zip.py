"""Read a PyTorch `torch.save` file of tensors (a state dict) into NumPy arrays, without PyTorch.

Two on-disk layouts are understood:

* **zip** (the default since PyTorch 1.6): a zip archive `<prefix>/data.pkl` (the pickled object)
  plus one raw little-endian buffer per storage in `<prefix>/data/<key>`;
* **legacy** (PyTorch < 1.6, or `_use_new_zipfile_serialization=False`): consecutive pickles (magic
  number, protocol version, system info, the object, the list of storage keys), then each storage
  as an int64 element count followed by its raw bytes, in the order of that list.

The object pickle is read with a restricted `pickle.Unpickler` that resolves only the few globals a
state dict of dense CPU/GPU tensors needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`
and the typed storage classes such as `torch.FloatStorage`); anything else (a pickled module, a
TorchScript archive, arbitrary code) is refused with a clear error. Tensors come back as NumPy
arrays (copies) with their size, stride and storage offset applied; the storage's device is ignored.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


def _bfloat16():
    import ml_dtypes  # a JAX dependency

    return np.dtype(ml_dtypes.bfloat16)


class TorchFileError(ValueError):
    """The file is not a state dict of tensors that this reader understands."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name

    @property
    def dtype(self) -> np.dtype:
        if self.name == "BFloat16Storage":
            return _bfloat16()
        return _STORAGE_DTYPES[self.name]


class _Storage:
    """A storage's raw elements (1-D NumPy array), filled in lazily for the legacy format."""

    def __init__(self, array: np.ndarray | None, dtype: np.dtype, numel: int):
        self.array, self.dtype, self.numel = array, dtype, numel


def _rebuild_tensor(storage: _Storage, storage_offset: int, size, stride, *unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
    backward_hooks[, metadata])` as a NumPy copy."""
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"tensor storage of unexpected type {type(storage).__name__}")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise TorchFileError(f"tensor size {size} and stride {stride} differ in rank")
    if storage.array is None:  # legacy format: data is read after the object pickle
        return _PendingTensor(storage, int(storage_offset), size, stride)
    return _view(storage.array, int(storage_offset), size, stride)


def _view(flat: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    if any(s < 0 for s in stride) or offset < 0:
        raise TorchFileError(f"negative stride/offset: stride {stride}, offset {offset}")
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise TorchFileError(f"tensor (size {size}, stride {stride}, offset {offset}) runs past its "
                             f"storage of {flat.size} elements")
    base = flat[offset:]
    out = np.lib.stride_tricks.as_strided(base, shape=size, strides=[s * flat.itemsize for s in stride])
    return np.array(out, copy=True)


class _PendingTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self) -> np.ndarray:
        return _view(self.storage.array, self.offset, self.size, self.stride)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, backward_hooks, *unused: data,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and (name in _STORAGE_DTYPES or name == "BFloat16Storage"):
            return _StorageType(name)
        raise TorchFileError(
            f"refusing to unpickle the global {module}.{name}: only state dicts of plain tensors (and "
            "OrderedDicts) are read without PyTorch. Save the weights with "
            "`torch.save(model.state_dict(), path)`, or convert them to .npz with the same names")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise TorchFileError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])  # pid[3]: device, ignored
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unsupported storage type {storage_type!r:.80}")
        if len(pid) > 5 and pid[5] is not None:
            raise TorchFileError("storage views (legacy view_metadata) are not supported")
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.dtype, numel)
        return self._storages[key]


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _PendingTensor):
        return obj.resolve()
    if isinstance(obj, dict):  # in place: keeps an OrderedDict's `_metadata` attribute
        for k in list(obj):
            obj[k] = _resolve(obj[k])
        return obj
    if isinstance(obj, list):
        obj[:] = [_resolve(v) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchFileError(f"{path}: a zip file but not a torch.save archive (no <prefix>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in names or prefix + "code/" in {n[: len(prefix) + 5] for n in names}:
            raise TorchFileError(
                f"{path}: a TorchScript archive (torch.jit.save), not a state dict; it needs PyTorch")
        if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
            raise TorchFileError(f"{path}: big-endian tensor data is not supported")

        def load_storage(key: str, dtype: np.dtype, numel: int) -> _Storage:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise TorchFileError(f"{path}: missing storage record {name}")
            raw = zf.read(name)
            if len(raw) < numel * dtype.itemsize:
                raise TorchFileError(f"{path}: storage {key} has {len(raw)} bytes, expected "
                                     f"{numel} x {dtype.itemsize}")
            return _Storage(np.frombuffer(raw, dtype, count=numel), dtype, numel)

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        def plain():  # the header pickles hold only ints, dicts and strings
            return _Unpickler(f, lambda *a: (_ for _ in ()).throw(TorchFileError("unexpected storage"))).load()

        try:
            magic = plain()
        except Exception as e:
            raise TorchFileError(f"{path}: neither a zip nor a legacy torch.save file ({e})") from e
        if magic != _LEGACY_MAGIC:
            raise TorchFileError(f"{path}: not a torch.save file (bad magic number)")
        plain()  # protocol version
        sys_info = plain()
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise TorchFileError(f"{path}: big-endian tensor data is not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(key, dtype, numel):
            storages[key] = _Storage(None, dtype, numel)
            return storages[key]

        obj = _Unpickler(f, load_storage).load()
        keys = plain()
        for key in keys:
            st = storages.get(str(key))
            head = f.read(8)
            if len(head) != 8:
                raise TorchFileError(f"{path}: truncated at storage {key}")
            (numel,) = struct.unpack("<q", head)
            itemsize = st.dtype.itemsize if st is not None else 1
            raw = f.read(numel * itemsize)
            if len(raw) != numel * itemsize:
                raise TorchFileError(f"{path}: truncated in storage {key}")
            if st is not None:
                st.array = np.frombuffer(raw, st.dtype, count=numel)
        return _resolve(obj)


def load(path: str | os.PathLike) -> Any:
    """The object in a `torch.save` file (a state dict: name -> np.ndarray), read without PyTorch."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)
