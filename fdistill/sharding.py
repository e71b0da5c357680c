"""Data parallelism and parameter sharding (FSDP) on a ('data', 'fsdp') mesh.

The mesh has `devices / fsdp` rows on 'data' and `fsdp` columns on 'fsdp' (`config.mesh.fsdp`,
default 1: pure data parallelism). The batch is sharded on its leading axis over both axes
(`P(('data', 'fsdp'))`). Parameters, optimiser states, EMAs and frozen networks follow
`ShardingRules`: regex -> PartitionSpec rules (`config.mesh.rules`, first match wins), and by
default the largest dimension divisible by `fsdp` of every leaf with at least `min_size` elements
is split over 'fsdp' (ZeRO-3 / FSDP; big_vision's `fsdp` strategy), the rest replicated. XLA's
SPMD partitioner inserts the all-gathers and reduce-scatters. The same code runs on one CPU, 8
simulated CPU devices, one GPU and a multi-host pod.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdistill.configs import ConfigError  # a bad config.mesh field: one line, exit status 2

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch's leading axis is split over every device
_distributed_initialised = False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: bool | None = None,
) -> None:
    """Idempotent `jax.distributed.initialize`.

    Explicit arguments win; otherwise the environment variables FDISTILL_COORDINATOR,
    FDISTILL_NUM_PROCESSES and FDISTILL_PROCESS_ID are read. With none of them, nothing happens
    unless JAX can detect a cluster by itself (TPU pods, SLURM), in which case
    `jax.distributed.initialize()` is called without arguments when FDISTILL_AUTO_DISTRIBUTED=1.
    On CPU several processes need gloo collectives; they are enabled when the platform is CPU.
    """
    global _distributed_initialised
    if _distributed_initialised:
        return
    coordinator_address = coordinator_address or os.environ.get("FDISTILL_COORDINATOR")
    if num_processes is None and os.environ.get("FDISTILL_NUM_PROCESSES"):
        num_processes = int(os.environ["FDISTILL_NUM_PROCESSES"])
    if process_id is None and os.environ.get("FDISTILL_PROCESS_ID"):
        process_id = int(os.environ["FDISTILL_PROCESS_ID"])
    if coordinator_address is None and os.environ.get("FDISTILL_AUTO_DISTRIBUTED") != "1":
        return
    if cpu_collectives is None:
        cpu_collectives = os.environ.get("JAX_PLATFORMS", "").startswith("cpu")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    _distributed_initialised = True


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh of shape (n / fsdp, fsdp) over the first `num_devices` devices
    (default: all, all processes); `fsdp` must divide n."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        devices = devices[:num_devices]
    n = len(devices)
    if int(fsdp) < 1 or n % int(fsdp):
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ConfigError(f"config.mesh.fsdp={fsdp} must divide the number of devices ({n}); allowed: {divisors}")
    shape = (n // int(fsdp), int(fsdp))
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh(shape, BATCH_AXES, axis_types=auto, devices=devices)
    order = [d.process_index for d in mesh.devices.flat]
    if order != sorted(order):
        # Process p loads rows `process_slice(batch, p, P)` of every global batch, and
        # `make_array_from_process_local_data` puts them on p's devices in mesh order (row-major
        # over ('data', 'fsdp')): keep each process's devices together and in process order (a
        # stable sort keeps the order chosen by `make_mesh` inside each process), so that the
        # global batch is the same array on any number of processes.
        flat = sorted(mesh.devices.flat, key=lambda d: d.process_index)
        mesh = Mesh(np.array(flat).reshape(shape), BATCH_AXES, axis_types=auto)
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


# ----- parameter sharding rules -------------------------------------------------------------------


def leaf_paths(tree: Any) -> list[str]:
    """'params/gen/Dense_0/kernel'-style paths of `tree`'s leaves, in flattening order."""
    return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _parse_spec(text: str, where: str) -> tuple:
    """'replicate' -> (); 'None,fsdp' -> (None, 'fsdp') (entries: an axis name or None)."""
    text = text.strip()
    if text in ("replicate", ""):
        return ()
    spec = []
    for part in text.split(","):
        part = part.strip()
        if part in ("None", "none", "."):
            spec.append(None)
        elif part in BATCH_AXES:
            spec.append(part)
        else:
            raise ConfigError(f"{where}: {part!r} is not a mesh axis; a spec is 'replicate' or comma-separated "
                             f"entries from {list(BATCH_AXES)} and None, e.g. 'None,fsdp'")
    return tuple(spec)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Leaf path and shape -> PartitionSpec.

    `rules`: ('regex=spec', ...), searched in order against a leaf's path ('params/gen/Dense_0/kernel',
    'opt_state/gen/1/0/mu/Dense_0/kernel', 'teacher/...'); spec 'replicate' or e.g. 'None,fsdp'. A
    leaf no rule matches is split over 'fsdp' on its largest dimension divisible by `fsdp` (the
    first such on ties) when it has at least `min_size` elements, else replicated. Parameters,
    their Adam moments and their EMA have the same shapes, hence the same default sharding.
    """

    fsdp: int = 1
    min_size: int = 2**14
    rules: tuple[tuple[str, tuple], ...] = ()

    @classmethod
    def from_config(cls, mesh_config) -> "ShardingRules":
        rules = []
        for i, text in enumerate(mesh_config.rules):
            where = f"config.mesh.rules[{i}]={text!r}"
            pattern, sep, spec = str(text).rpartition("=")
            if not sep or not pattern:
                raise ConfigError(f"{where}: expected 'regex=spec', e.g. 'Embed_0/embedding=fsdp,None'")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where}: {pattern!r} is not a regular expression ({e})") from None
            rules.append((pattern, _parse_spec(spec, where)))
        if int(mesh_config.min_shard_size) < 0:
            raise ConfigError(f"config.mesh.min_shard_size must be >= 0, got {mesh_config.min_shard_size}")
        return cls(int(mesh_config.fsdp), int(mesh_config.min_shard_size), tuple(rules))

    def spec(self, path: str, shape: Sequence[int]) -> P:
        for pattern, spec in self.rules:
            if re.search(pattern, path):
                self._check(path, shape, spec, pattern)
                return P(*spec)
        if self.fsdp == 1 or math.prod(shape) < self.min_size:
            return P()
        candidates = [i for i, d in enumerate(shape) if d % self.fsdp == 0]
        if not candidates:
            return P()
        axis = max(candidates, key=lambda i: (shape[i], -i))
        return P(*([None] * axis + [FSDP_AXIS]))

    def _check(self, path: str, shape, spec: tuple, pattern: str) -> None:
        if len(spec) > len(shape):
            raise ConfigError(f"config.mesh.rules: {pattern!r} gives {spec} to {path} of shape {tuple(shape)} "
                             f"(more entries than dimensions)")
        for dim, axis in zip(shape, spec):
            if axis == FSDP_AXIS and dim % self.fsdp:
                raise ConfigError(f"config.mesh.rules: {pattern!r} splits a dimension of size {dim} of {path} "
                                 f"{tuple(shape)} over fsdp={self.fsdp}, which does not divide it")

    def shardings(self, tree: Any, mesh: Mesh) -> Any:
        """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        specs = [self.spec(path, np.shape(x)) for path, x in zip(leaf_paths(tree), leaves)]
        return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def place(tree: Any, shardings: Any) -> Any:
    """Puts a pytree of host (or device) arrays onto `shardings` (one per leaf, or one for all):
    every device receives only its own shard, and every process only builds its own devices'
    shards, so no device ever holds a full copy of a sharded leaf."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        # Always from a host copy: leaves that share a buffer (e.g. params and their EMA at
        # initialisation) must become distinct device buffers, or donating the state fails.
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "config.train.batch_size") -> None:
    """A global batch must split evenly over the devices and the processes."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"{field}={global_batch} is not divisible by the number of devices ({n}); "
            f"use a multiple of {n}"
        )


def process_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows of the global batch that this process loads."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Process-local NumPy arrays (leading axis = local batch) -> global arrays on P('data')."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree replicated on every device of the mesh (works across processes)."""
    return place(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
    """The whole value of every array as host NumPy: sharded arrays are gathered (across processes
    with a collective, so every process must call it at the same point), replicated ones read from
    a local copy."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                x = x.addressable_data(0)
            else:
                from jax.experimental import multihost_utils

                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def max_over_processes(value: int) -> int:
    """The largest `value` over all processes (a collective: every process must call it at the
    same point). Used to stop all processes at the same step when any of them got a signal (the
    value is the signal number, 0 for none); with one process it returns `value` without
    communicating."""
    return maxima_over_processes((value,))[0]


def maxima_over_processes(values: tuple[int, ...]) -> tuple[int, ...]:
    """The elementwise largest of `values` over all processes, in one collective (like
    `max_over_processes`): the training loop agrees on its stop signal and on a due checkpoint
    with a single exchange per log step."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.array([int(v) for v in values], np.int32))
    return tuple(int(v) for v in np.max(np.asarray(gathered).reshape(-1, len(values)), axis=0))


def any_process(flag: bool) -> bool:
    """True in every process if `flag` is True in any process (a collective, like
    `max_over_processes`)."""
    return bool(max_over_processes(int(bool(flag))))
