"""Pieces shared by objectives: gradient accumulation over micro-batches."""
from __future__ import annotations

from typing import Any, Callable

import jax


def micro_batch(tree: Any, index: int, num: int) -> Any:
    """Rows index, index+num, index+2num, ... of every leaf: a strided split keeps each micro-batch
    spread evenly over the devices of a batch sharded on its leading axis (no resharding)."""
    return jax.tree.map(lambda x: x[index::num], tree)


def accumulated_value_and_grad(loss_fn: Callable, params: Any, inputs: Any, num_micro: int, has_aux: bool = False):
    """`jax.value_and_grad(loss_fn)(params, inputs)` computed over `num_micro` equal micro-batches.

    `loss_fn(params, inputs)` must be a mean over the leading axis of `inputs`, so the mean of the
    micro-batch values and gradients equals the full-batch ones. The loop is unrolled in Python
    (conv gradients inside lax.scan are ~20x slower on CPU; see environment notes).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
    if num_micro == 1:
        return grad_fn(params, inputs)
    total = None
    for i in range(num_micro):
        out = grad_fn(params, micro_batch(inputs, i, num_micro))
        total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)
    return jax.tree.map(lambda a: a / num_micro, total)
