"""The one training loop, shared by every objective (see `fdistill.objectives.base`).

`train_and_evaluate(config, workdir)` writes into `workdir`:
  config.json, checkpoints/, metrics.jsonl, tb/ (TensorBoard events), plots/, results.json.
Re-running the same command resumes from the latest checkpoint; raising `config.train.num_steps`
continues training. A NaN/inf metric or state stops training with an error naming the step and
the metric, before it can be checkpointed. SIGTERM saves a checkpoint and returns cleanly.
"""
from __future__ import annotations

import collections
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fdistill import checkpoint as ckpt_lib
from fdistill import configs
from fdistill import objectives
from fdistill import sharding

# Steps dispatched ahead of the host. A deep queue of collective programs deadlocks XLA's CPU
# runtime with several (simulated or multi-process) CPU devices: the all-reduce rendezvous times
# out after 40 s and aborts (measured with 2 and 4 devices, ~50 steps queued). A few steps in
# flight keep the device busy on every backend.
MAX_STEPS_IN_FLIGHT = 4



class NonFiniteError(FloatingPointError):
    """A training metric or the training state became NaN/inf."""


def validate_train_config(config) -> None:
    """Sane values of the loop's fields (their presence is guaranteed by `configs.complete`)."""
    for field in ("num_steps", "batch_size", "log_every"):
        if int(config.train[field]) <= 0:
            raise ValueError(f"config.train.{field} must be positive, got {config.train[field]}")


class MetricWriter:
    """metrics.jsonl (one JSON object per row, each with `step`) and TensorBoard events (process 0)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{prefix + k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(prefix + k, v, step)
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _jsonable(v):
    """Python scalars for JSON; integers stay integers, NaN/inf become strings."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v) if isinstance(v, (float, np.floating)) else v
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def _to_floats(metrics) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in sharding.to_host(metrics).items()}


def _check_finite(metrics: dict[str, float], step: int, what: str = "metric") -> None:
    for k, v in metrics.items():
        if not math.isfinite(v):
            raise NonFiniteError(
                f"training stopped: {what} {k!r} is {v} at step {step}; "
                "the last good checkpoint (if any) is still in the workdir"
            )


@jax.jit
def _tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class _StopFlag:
    """Set by SIGTERM/SIGINT-like preemption signals; the loop saves and returns."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        try:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no signal handling
            pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temporary file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def train_and_evaluate(config, workdir: str, num_devices: int | None = None) -> dict[str, float] | None:
    """Trains `config.objective` for `config.train.num_steps` steps in `workdir`, then evaluates.

    Returns the final evaluation metrics (also written to results.json), or None when training
    was stopped by SIGTERM (a checkpoint was saved; re-running resumes).
    """
    sharding.initialize_distributed()
    config = configs.complete(config)
    validate_train_config(config)
    mesh = sharding.make_mesh(num_devices)
    sharding.check_batch_size(config.train.batch_size, mesh)
    objective = objectives.build(config)
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    plot_dir = os.path.join(workdir, "plots")
    if is_main:
        os.makedirs(plot_dir, exist_ok=True)
        write_json(os.path.join(workdir, "config.json"), config.to_dict())
    tc = config.train
    num_steps = int(tc.num_steps)

    key = jax.random.PRNGKey(tc.seed)
    init_key, eval_key = jax.random.split(key)
    state, frozen = objective.init(init_key)
    repl = sharding.replicated(mesh)
    state = sharding.replicate(state, mesh)
    frozen = sharding.replicate(frozen, mesh)

    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints, save_every=tc.checkpoint_every
    )
    restored = ckpt.restore_latest(ckpt_lib.abstract_like(state, repl))
    start = 0
    if restored is not None:
        state, start = restored
        _log(is_main, f"resumed from {workdir}/checkpoints at step {start}")

    results_path = os.path.join(workdir, "results.json")
    if start >= num_steps and os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if results.get("step") == start:
            _log(is_main, f"already trained to step {start}; results in {results_path}")
            ckpt.close()
            return results

    writer = MetricWriter(workdir, is_main)
    pidx, pcount = jax.process_index(), jax.process_count()
    step = start
    stopped = False
    try:
        if step < num_steps:
            batch = sharding.shard_batch(objective.batch(step, pidx, pcount), mesh)
            step_fn = jax.jit(
                objective.train_step,
                in_shardings=(repl, repl, sharding.batch_sharding(mesh)),
                out_shardings=(repl, repl),
                donate_argnums=(0,),
            )
            t0 = time.perf_counter()
            compiled = step_fn.lower(state, frozen, batch).compile()
            _log(is_main, f"compiled the {objective.name} step in {time.perf_counter() - t0:.1f}s; "
                 + _describe_compiled(compiled))

        with _StopFlag() as stop, tqdm(total=num_steps, initial=step, disable=not is_main, mininterval=2.0,
                                       desc=objective.name, dynamic_ncols=True) as bar:
            t_log, step_log = time.perf_counter(), step
            in_flight = collections.deque()
            while step < num_steps:
                if step > start:
                    batch = sharding.shard_batch(objective.batch(step, pidx, pcount), mesh)
                state, metrics = compiled(state, frozen, batch)
                in_flight.append(metrics)
                if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                    jax.block_until_ready(in_flight.popleft())
                step += 1
                bar.update(1)
                stop_now = stop.requested  # read once: the signal may arrive at any moment
                if pcount > 1:
                    # All processes must stop at the same step, or the others block forever in
                    # the next step's collectives: agree on log steps (already host-synchronous).
                    stop_now = step % tc.log_every == 0 and sharding.any_process(stop_now)
                save_now = ckpt.should_save(step) or step == num_steps or stop_now
                if step % tc.log_every == 0 or save_now:
                    values = _to_floats(metrics)
                    _check_finite(values, step)
                    now = time.perf_counter()
                    values["steps_per_sec"] = (step - step_log) / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    writer.write(step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
                if save_now:
                    if not bool(_tree_all_finite(state)):
                        raise NonFiniteError(f"training stopped: the state has NaN/inf values at step {step}; "
                                             "not checkpointed, the last good checkpoint remains")
                    ckpt.save(step, state)
                if stop_now:
                    stopped = True
                    break
                if tc.eval_every and step % tc.eval_every == 0 and step < num_steps:
                    _evaluate(objective, state, frozen, eval_key, step, writer, plot_dir, is_main)
        ckpt.wait()
        if stopped:
            _log(is_main, f"stop requested (SIGTERM): saved step {step}; re-run the same command to resume")
            return None
        results = _evaluate(objective, state, frozen, eval_key, step, writer, plot_dir, is_main)
        results["step"] = step
        if is_main:
            write_json(results_path, {k: _jsonable(v) for k, v in results.items()})
            _log(is_main, "results: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()
                                                  if isinstance(v, (int, float))))
        return results
    finally:
        ckpt.close()
        writer.close()


def _evaluate(objective, state, frozen, key, step, writer, plot_dir, is_main) -> dict[str, float]:
    """Runs the objective's evaluation on a host-local copy of the state (every process computes
    the same numbers locally; process 0 writes them and the plots)."""
    local_state = jax.tree.map(jnp.asarray, sharding.to_host(state))
    local_frozen = jax.tree.map(jnp.asarray, sharding.to_host(frozen))
    t0 = time.perf_counter()
    metrics = {k: float(v) for k, v in objective.evaluate(local_state, local_frozen, key).items()}
    metrics["eval_seconds"] = time.perf_counter() - t0
    writer.write(step, metrics, prefix="eval/")
    if is_main:
        objective.plot(local_state, local_frozen, plot_dir, step)
    return metrics


def _describe_compiled(compiled) -> str:
    parts = []
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            parts.append(f"{cost['flops'] / 1e6:.2f} MFLOP/step")
    except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
        pass
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            parts.append(f"memory/device: args {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
                         f"temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, total {total / 2**20:.1f} MiB")
    except Exception:  # noqa: BLE001
        pass
    return "; ".join(parts)


def _log(is_main: bool, msg: str) -> None:
    if is_main:
        tqdm.write(f"[fdistill] {msg}")
