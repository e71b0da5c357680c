"""Evaluation results that are pure functions of their inputs, computed once per run.

A frozen teacher's sample metrics are the same at every evaluation of a run (same parameters, same
evaluation key and labels, same settings), yet drawing them takes minutes (16384 digits samples
with a 35-step sampler: ~7 min on one CPU core), and every invocation of a resumed run used to draw
them again. `ResultCache` keeps such results in memory and, when the training loop gives it the
workdir's `cache/` directory, in one JSON file per result there, named by a SHA-256 fingerprint of
everything the result depends on: the settings (a JSON-able dict), the parameters
(`tree_fingerprint`), keys and labels, the source code of the `fdistill` package and the versions
of JAX and NumPy (`code_fingerprint`: any edit recomputes), and the devices
(`device_signature`: a throughput is only reused on the same kind and number of devices, and on
CPU on the same host). Files that the metrics read and the config names only by path (the digits
classifier, an FID reference) are not fingerprinted: delete `cache/` after replacing one in place.

Only process 0 writes; a result is reused only when every process finds it (a collective, so that
all processes either skip the computation or join it). A file that cannot be read or lacks a
required key is ignored with a warning and rewritten; a failed write is reported and the run goes
on; results with a non-finite value are not kept.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import socket
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdistill import sharding
from fdistill import workdir as workdir_lib

# (kind, fingerprint) -> {"result": ..., "computed_from": ...}, shared by every cache of the process
# (a table script's runs in one process share their teacher's metrics).
_MEMORY: dict[tuple[str, str], dict] = {}


def _mix(bits, seed: int):
    """A 32-bit hash of each element and its position (the murmur3 finalizer of bits ^ position);
    summed mod 2^32 over a leaf, the order of the elements matters and the sum does not depend on
    how the leaf is sharded."""
    idx = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    v = bits ^ (idx * jnp.uint32(0x9E3779B1) + jnp.uint32(seed))
    v = (v ^ (v >> 16)) * jnp.uint32(0x85EBCA6B)
    v = (v ^ (v >> 13)) * jnp.uint32(0xC2B2AE35)
    return v ^ (v >> 16)


def _leaf_hashes(leaf):
    x = jnp.asarray(leaf)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8-byte types gain a last axis of 2
    return jnp.stack([jnp.sum(_mix(bits, seed), dtype=jnp.uint32) for seed in (0, 0x27D4EB2F)])


_tree_hashes = jax.jit(lambda leaves: [_leaf_hashes(x) for x in leaves])


def tree_fingerprint(tree) -> str:
    """A hex fingerprint of a pytree's structure, shapes, dtypes and values (their bits as JAX
    holds them). The values are hashed on their devices (jitted), so sharded and multi-process
    arrays are never gathered, and the result is the same for any sharding."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h = hashlib.sha256(str(treedef).encode())
    for leaf, pair in zip(leaves, sharding.to_host(_tree_hashes(leaves))):
        dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        h.update(f"{np.shape(leaf)}{dtype}".encode())
        h.update(np.asarray(pair).tobytes())
    return h.hexdigest()


def inputs_fingerprint(settings: dict[str, Any], arrays: dict[str, Any] | None = None) -> str:
    """SHA-256 of `settings` (JSON, keys sorted) and of the exact bytes of each host array in
    `arrays` (None allowed; a JAX PRNG key is hashed through its key data)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(arrays or {}):
        value = arrays[name]
        if value is not None and jnp.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        a = None if value is None else np.ascontiguousarray(np.asarray(value))
        h.update(f"{name}:{None if a is None else (a.shape, str(a.dtype))}".encode())
        if a is not None:
            h.update(a.tobytes())
    return h.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 of every .py file of the `fdistill` package and of the JAX, jaxlib and NumPy
    versions: results computed by other code are not reused. Read once per process, when the first
    `ResultCache` is made (a run's start, right after its imports), so that a source file edited
    while a long run trains does not label that run's results as the edited code's."""
    import jaxlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(f"jax {jax.__version__} jaxlib {jaxlib.__version__} numpy {np.__version__}".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(n for n in filenames if n.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def device_signature() -> dict[str, Any]:
    """What a measured throughput depends on: the devices, and on CPU the host and its cores."""
    sig = {"platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "device_count": jax.device_count(), "process_count": jax.process_count()}
    if sig["platform"] == "cpu":
        sig.update(host=socket.gethostname(), cpus=len(os.sched_getaffinity(0)))
    return sig


def _checked(result: Any, required: tuple[str, ...]) -> dict[str, float]:
    """`result` as {name: finite float}; TypeError or ValueError when it is not one or lacks a
    `required` key."""
    if not isinstance(result, dict):
        raise TypeError(f"expected a JSON object of metrics, got {type(result).__name__}")
    out = {str(k): float(v) for k, v in result.items()}
    missing = [k for k in required if k not in out]
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if missing or bad:
        raise ValueError(f"missing {missing}" if missing else f"non-finite {bad}")
    return out


class ResultCache:
    """Results by fingerprint, in memory and (when `directory` is set) in `directory/<kind>-<fp>.json`.
    Only a cache with `writes=True` (process 0's) writes files."""

    def __init__(self, directory: str | None = None, writes: bool = True):
        self.directory, self.writes = directory, writes
        code_fingerprint()  # the code this process imported (see its docstring)

    def _path(self, kind: str, fp: str) -> str:
        return os.path.join(self.directory, f"{kind}-{fp[:24]}.json")

    def _read(self, kind: str, fp: str, required: tuple[str, ...]) -> dict | None:
        path = self._path(kind, fp)
        try:
            stored = workdir_lib.read_json(path)
            if stored is None:
                return None
            if not isinstance(stored, dict) or stored.get("fingerprint") != fp:
                raise ValueError("it holds another fingerprint")
            return {"result": _checked(stored.get("result"), required), "computed_from": stored.get("computed_from")}
        except (OSError, ValueError, TypeError) as e:
            print(f"[fdistill] WARNING: ignoring the unreadable cache file {path} ({e}); computing it again",
                  file=sys.stderr, flush=True)
            return None

    def get(self, kind: str, fp: str, required: tuple[str, ...] = ()) -> dict[str, float] | None:
        """The result stored under `fp`, or None when any process lacks it (a collective). A result
        found in memory is also written to this cache's directory when that lacks it."""
        entry = _MEMORY.get((kind, fp))
        if entry is None and self.directory is not None:
            entry = self._read(kind, fp, required)
        if sharding.any_process(entry is None):
            return None
        _MEMORY[kind, fp] = entry
        if self.writes and self.directory is not None and not os.path.exists(self._path(kind, fp)):
            self._write(kind, fp, entry)
        return dict(entry["result"])

    def put(self, kind: str, fp: str, result: dict[str, float], computed_from: dict[str, Any]) -> None:
        """Keeps `result` under `fp` (unless a value is not finite); `computed_from` (JSON-able) is
        written beside it for whoever reads the file."""
        try:
            entry = {"result": _checked(result, ()), "computed_from": computed_from}
        except (TypeError, ValueError):
            return
        _MEMORY[kind, fp] = entry
        self._write(kind, fp, entry)

    def _write(self, kind: str, fp: str, entry: dict) -> None:
        if self.directory is None or not self.writes:
            return
        path = self._path(kind, fp)
        try:
            os.makedirs(self.directory, exist_ok=True)
            workdir_lib.write_json(path, {"fingerprint": fp, **entry, "time": workdir_lib.utc_now()})
        except (OSError, TypeError, ValueError) as e:
            print(f"[fdistill] WARNING: could not write the cache file {path} ({e}); the run goes on without it",
                  file=sys.stderr, flush=True)


def forget_in_memory() -> None:
    """Empties the process's in-memory results (tests; a new process)."""
    _MEMORY.clear()
