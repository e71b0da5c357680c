"""Data parallelism by sharding: one 'data' mesh axis over every device of every process.

The batch is sharded on its leading axis (`P('data')`), state and frozen parameters are replicated
(`P()`). The same code runs on one CPU, 8 simulated CPU devices, one GPU and a multi-host pod.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
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


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ('data',) mesh over the first `num_devices` devices (default: all, all processes)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        devices = devices[:num_devices]
    mesh = jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    order = [d.process_index for d in mesh.devices.flat]
    if order != sorted(order):
        # Process p loads rows `process_slice(batch, p, P)` of every global batch, and
        # `make_array_from_process_local_data` puts them on p's devices in mesh order: keep each
        # process's devices together and in process order (a stable sort keeps the order chosen
        # by `make_mesh` inside each process), so that the global batch is the same array on any
        # number of processes.
        flat = sorted(mesh.devices.flat, key=lambda d: d.process_index)
        mesh = Mesh(np.array(flat), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


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
    sharding = replicated(mesh)

    def put(x):
        # Always from a host copy: leaves that share a buffer (e.g. params and their EMA at
        # initialisation) must become distinct device buffers, or donating the state fails.
        x = np.asarray(jax.device_get(x))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Fetches (replicated or fully addressable) arrays to host NumPy."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def max_over_processes(value: int) -> int:
    """The largest `value` over all processes (a collective: every process must call it at the
    same point). Used to stop all processes at the same step when any of them got a signal (the
    value is the signal number, 0 for none); with one process it returns `value` without
    communicating."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    values = multihost_utils.process_allgather(np.array([int(value)], np.int32))
    return int(np.max(values))


def any_process(flag: bool) -> bool:
    """True in every process if `flag` is True in any process (a collective, like
    `max_over_processes`)."""
    return bool(max_over_processes(int(bool(flag))))
