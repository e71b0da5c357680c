"""Where a run's arrays live: the state, the frozen networks and the batch on the device mesh.

Shape first, then shard (DESIGN, "Direction"): the frozen networks are put shard-wise onto their
shardings (those of other runs' checkpoints, `checkpoint.StoredTree`, restored by Orbax straight
onto them), `jax.eval_shape(objective.init_state)` gives the state's shapes, `config.mesh`'s rules
(`sharding.ShardingRules`) turn them into shardings, and `jax.jit(init_state, out_shardings=...)`
creates the state already placed, so no device ever holds a full copy of a sharded leaf. The step
is jitted with the same per-leaf shardings in and out and the state donated:

    placement, frozen = placement.on_mesh(objective, key, mesh, rules)
    state = placement.init_state(objective, key, frozen)   # or restore `placement.abstract_state`
    step = placement.jit_step(objective)                   # step(state, frozen, batch) -> (state, metrics)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from fdistill import checkpoint, sharding
from fdistill.models import param_count


@dataclasses.dataclass(frozen=True)
class Placement:
    """The mesh and one run's state and frozen networks as ShapeDtypeStructs carrying their
    shardings (`abstract_state` is the checkpoint restore target); `state` and `frozen` are the
    pytrees of their NamedShardings."""

    mesh: Mesh
    abstract_state: Any
    abstract_frozen: Any

    @property
    def state(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self.abstract_state)

    @property
    def frozen(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self.abstract_frozen)

    @property
    def batch(self) -> jax.sharding.NamedSharding:
        return sharding.batch_sharding(self.mesh)

    def init_state(self, objective, key, frozen) -> Any:
        """A fresh state, created on its shardings."""
        return jax.jit(objective.init_state, out_shardings=self.state)(key, frozen)

    def jit_step(self, objective) -> Any:
        """`objective.train_step` jitted with per-leaf shardings in and out (metrics replicated) and
        the state donated."""
        return jax.jit(objective.train_step, in_shardings=(self.state, self.frozen, self.batch),
                       out_shardings=(self.state, sharding.replicated(self.mesh)), donate_argnums=(0,))

    def without_frozen(self, keys: tuple[str, ...]) -> "Placement":
        """This placement with the frozen entries `keys` removed (`Objective.init_only`)."""
        kept = {k: v for k, v in self.abstract_frozen.items() if k not in keys}
        return dataclasses.replace(self, abstract_frozen=kept)

    def describe(self) -> str:
        """'mesh data=2 x fsdp=4; 0.33M trained parameters; state 1.2 MiB/device of 4.8 MiB (31 of 40
        leaves sharded); frozen ...'."""
        shape = dict(self.mesh.shape)
        parts = [f"mesh data={shape[sharding.DATA_AXIS]} x fsdp={shape[sharding.FSDP_AXIS]}",
                 f"{param_count(self.abstract_state.params) / 1e6:.2f}M trained parameters"]
        for name, tree in (("state", self.abstract_state), ("frozen", self.abstract_frozen)):
            per, total, split, count = per_device_bytes(tree)
            if count:
                parts.append(f"{name} {per / 2**20:.2f} MiB/device of {total / 2**20:.2f} MiB "
                             f"({split} of {count} leaves sharded)")
        return "; ".join(parts)


def per_device_bytes(tree: Any) -> tuple[int, int, int, int]:
    """(bytes one device holds, total bytes, sharded leaves, leaves) of arrays or ShapeDtypeStructs
    that carry a sharding."""
    per = total = split = 0
    leaves = jax.tree.leaves(tree)
    for x in leaves:
        nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        shard = x.sharding.shard_shape(x.shape)
        per += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
        total += nbytes
        split += tuple(shard) != tuple(x.shape)
    return per, total, split, len(leaves)


def is_stored(x: Any) -> bool:
    """Whether `x` is a frozen network read only when placed (`checkpoint.StoredTree`, or anything
    with its `abstract()` / `restore(shardings)` / `numpy()` methods, e.g. `llama.StoredCheckpoint`)."""
    return all(callable(getattr(x, name, None)) for name in ("abstract", "restore", "numpy"))


def frozen_shapes(tree: Any) -> Any:
    """ShapeDtypeStructs of frozen networks, stored ones from their checkpoint metadata (unread)."""
    return jax.tree.map(lambda x: x.abstract() if is_stored(x) else jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                        tree, is_leaf=is_stored)


def place_frozen(tree: Any, shardings: Any) -> Any:
    """Frozen networks onto `shardings`: stored ones restored straight onto them, host ones put
    shard by shard (`sharding.place`)."""
    return jax.tree.map(lambda x, s: x.restore(s) if is_stored(x) else sharding.place(x, s), tree, shardings,
                        is_leaf=is_stored)


def frozen_on_host(tree: Any) -> Any:
    """Frozen networks as host arrays (stored ones read): `Objective.init` for tests and tools."""
    return jax.tree.map(lambda x: x.numpy() if is_stored(x) else x, tree, is_leaf=is_stored)


def on_mesh(objective, key, mesh: Mesh, rules: sharding.ShardingRules) -> tuple[Placement, Any]:
    """The placement of `objective`'s arrays on `mesh`, and its frozen networks placed there."""
    host = objective.frozen()
    frozen_shardings = rules.shardings(frozen_shapes(host), mesh)
    frozen = place_frozen(host, frozen_shardings)
    abstract = jax.eval_shape(objective.init_state, key, frozen)
    return Placement(mesh, checkpoint.abstract_like(abstract, rules.shardings(abstract, mesh)),
                     checkpoint.abstract_like(frozen, frozen_shardings)), frozen
