"""The one training loop, shared by every objective (see `fdistill.objectives.base`).

`train_and_evaluate(config, workdir)` writes into `workdir` (see `fdistill.workdir` for what each
file guarantees): config.json, runs.jsonl, checkpoints/, metrics.jsonl, tb/ (TensorBoard events),
plots/, cache/ (evaluation results reused by later invocations), results.json. It holds the
workdir's lock while it runs. Re-running the same command resumes from the latest checkpoint;
raising `config.train.num_steps` continues training; changing a field that changes what is trained
is refused, changing an evaluation setting re-evaluates. A NaN/inf metric or state stops training
with an error naming the step and the metric, before it can be checkpointed. SIGTERM or Ctrl-C
saves a checkpoint and raises `Stopped` (exit status 143/130). Checkpoints are saved every
`train.checkpoint_every` steps and whenever `train.checkpoint_every_secs` of wall time have passed
since the last save, so a kill -9 loses at most that much training.
"""
from __future__ import annotations

import collections
import errno
import math
import os
import signal
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fdistill import checkpoint as ckpt_lib
from fdistill import configs
from fdistill import objectives
from fdistill import placement as placement_lib
from fdistill import sharding
from fdistill import workdir as workdir_lib
from fdistill.evaluation import cache as eval_cache

# Steps dispatched ahead of the host. A deep queue of collective programs deadlocks XLA's CPU
# runtime with several (simulated or multi-process) CPU devices: the all-reduce rendezvous times
# out after 40 s and aborts (measured with 2 and 4 devices, ~50 steps queued). A few steps in
# flight keep the device busy on every backend.
MAX_STEPS_IN_FLIGHT = 4

# The smallest evaluation sizes (checked at start, before any training): k-NN precision/recall
# (k = 3) need more than 3 samples; the other counts need at least one.
EVAL_MINIMA = {"num_samples": 4, "chunk": 1, "samples_per_prompt": 1, "num_heldout": 1, "num_pairs": 1}


class NonFiniteError(FloatingPointError):
    """A training metric or the training state became NaN/inf."""


class Stopped(SystemExit):
    """Training was stopped by a signal: SIGTERM (preemption, `kill`) or SIGINT (Ctrl-C).

    When `saved`, the checkpoint of `step` holds everything trained so far and re-running the same
    command resumes. It is a `SystemExit` with status 128 + the signal number (143 for SIGTERM,
    130 for SIGINT): uncaught, the process exits with that status and no traceback, so a script
    that trains several runs stops too (`experiments.tables.common.train_row` also reports which
    rows are complete)."""

    def __init__(self, signum: int, message: str, step: int | None = None, saved: bool = False):
        super().__init__(128 + int(signum))
        self.signum, self.message, self.step, self.saved = int(signum), message, step, saved
        self.signal_name = signal.Signals(signum).name

    def __str__(self) -> str:
        return self.message


def validate_config(config) -> None:
    """Sane values of the loop's fields and of the evaluation sizes (their presence is guaranteed
    by `configs.complete`), so that a run never trains and then fails to evaluate."""
    for field in ("num_steps", "batch_size", "log_every"):
        if int(config.train[field]) <= 0:
            raise configs.ConfigError(f"config.train.{field} must be positive, got {config.train[field]}")
    for field in ("checkpoint_every", "checkpoint_every_secs"):
        if float(config.train[field]) < 0:
            raise configs.ConfigError(f"config.train.{field} must be >= 0 (0 = never), got {config.train[field]}")
    for field, minimum in EVAL_MINIMA.items():
        if "eval" in config and field in config.eval and int(config.eval[field]) < minimum:
            raise configs.ConfigError(f"config.eval.{field}={config.eval[field]} is below the minimum {minimum}: the "
                             "evaluation after training could not run")


class MetricWriter:
    """metrics.jsonl (one JSON object per row, each with `step`) and TensorBoard events (process 0),
    written synchronously so that a failed write (a full disk) raises at the step that made it."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.events = None
        self.tb = os.path.join(workdir, "tb")
        if enabled:
            from tensorboardX.event_file_writer import EventsWriter

            os.makedirs(self.tb, exist_ok=True)
            with workdir_lib.naming(self.tb):
                self.events = EventsWriter(os.path.join(self.tb, "events"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        from tensorboardX.proto import event_pb2, summary_pb2

        row = {"step": int(step), **{prefix + k: _jsonable(v) for k, v in metrics.items()}}
        workdir_lib.append_jsonl(self.path, row)
        values = [summary_pb2.Summary.Value(tag=prefix + k, simple_value=float(v)) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)]
        with workdir_lib.naming(self.tb):
            self.events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                    summary=summary_pb2.Summary(value=values)))
            self.events.flush()

    def close(self, quiet: bool = False) -> None:
        """Closes the event file; `quiet` (while another error is being raised) ignores a failed flush."""
        if self.events is not None:
            events, self.events = self.events, None
            try:
                events.close()
            except OSError:
                if not quiet:
                    raise


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


XLA_COMPILER_MODULE = "jax._src.compiler"  # the JAX module whose frame waits while XLA compiles
POLL_SECONDS = 0.2  # how often a signal that arrived during a compilation checks whether it has finished


def _in_xla_compilation(frame) -> bool:
    """Whether a signal handler's `frame` (the main thread's innermost Python frame) is JAX's
    compiler waiting for XLA: the only Python frame on the stack while XLA compiles."""
    return frame is not None and frame.f_globals.get("__name__") == XLA_COMPILER_MODULE


class _StopFlag:
    """SIGTERM and SIGINT (Ctrl-C) for the length of one run.

    While the loop has progress that is not yet saved (`deferred`), the first signal is recorded in
    `signum`: the loop saves a checkpoint at the next step and raises `Stopped`; a repeated SIGTERM
    is ignored and a second Ctrl-C aborts at once without saving. Elsewhere (setting up, the final
    evaluation after the last checkpoint was written) nothing would be lost, and a signal raises
    `Stopped` at once, unless it lands while XLA compiles (the train step's compilation or one of
    the evaluation's): JAX lets a signal interrupt the wait for a compilation, but XLA goes on
    compiling in its own thread, and a process that exits before that thread is done dies of a
    segmentation fault (status 139 instead of 143/130). There the signal is recorded, a SIGALRM
    timer (its handler installed for the wait only) checks every POLL_SECONDS whether the main
    thread has left JAX's compiler, and `Stopped` is raised then; a second Ctrl-C during that wait
    exits at once with 130 (`os._exit`: nothing to save, and unwinding would crash the exit). A second Ctrl-C of the loop's deferral that lands
    in a compilation (a mid-run evaluation's) exits the same way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.deferred = False
        self.waiting_for_xla = False
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum and signum != signal.SIGINT:
            return  # already stopping
        if self.signum:  # a second Ctrl-C
            if self.waiting_for_xla:
                self._exit_at_once(signum, "aborted by a second Ctrl-C while compiling; nothing trained was lost; "
                                   "re-running the same command resumes")
            message = ("aborted by a second Ctrl-C without saving; re-running the same command resumes from the "
                       "latest checkpoint")
            if _in_xla_compilation(frame):
                self._exit_at_once(signum, message)
            tqdm.write(f"[fdistill] {message}")
            raise Stopped(signum, message)
        if self.deferred:
            self.signum = signum
            if signum == signal.SIGINT:
                tqdm.write("[fdistill] Ctrl-C: saving a checkpoint at the next step, then stopping "
                           "(press Ctrl-C again to abort at once without saving)")
            return
        if _in_xla_compilation(frame):
            self.signum, self.waiting_for_xla = signum, True
            again = " - press Ctrl-C again to abort at once" if signum == signal.SIGINT else ""
            tqdm.write(f"[fdistill] {name}: stopping once XLA has finished compiling (a compilation "
                       f"cannot be interrupted safely){again}")
            if signal.SIGALRM not in self._previous:  # taken only for this wait; __exit__ gives it back
                self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._poll)
            signal.setitimer(signal.ITIMER_REAL, POLL_SECONDS, POLL_SECONDS)
            return
        message = f"stopped by {name}; nothing trained was lost; re-running the same command resumes"
        tqdm.write(f"[fdistill] {message}")
        raise Stopped(signum, message)

    def _poll(self, signum, frame):
        """SIGALRM while a signal waits for a compilation: stops once it has finished."""
        if self.waiting_for_xla and not _in_xla_compilation(frame):
            self._stop_after_compiling()

    def _stop_after_compiling(self):
        """Raises `Stopped` for the signal that waited for a compilation, or leaves it to the loop to
        save and stop if the loop has begun meanwhile (`deferred`)."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.waiting_for_xla = False
        if self.deferred:
            return
        message = (f"stopped by {signal.Signals(self.signum).name} after compiling; nothing trained was lost; "
                   "re-running the same command resumes")
        tqdm.write(f"[fdistill] {message}")
        raise Stopped(self.signum, message)

    @staticmethod
    def _exit_at_once(signum, message):
        tqdm.write(f"[fdistill] {message}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.waiting_for_xla and exc_type is None:  # the block ended before the timer saw the end
                self._stop_after_compiling()
        finally:
            if signal.SIGALRM in self._previous:
                signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def train_and_evaluate(config, workdir: str, num_devices: int | None = None, force_new: bool = False) -> dict:
    """Trains `config.objective` for `config.train.num_steps` steps in `workdir`, then evaluates.

    Returns the final evaluation metrics, also written to results.json with `step` and
    `evaluated_with` (the evaluation settings). Raises `Stopped` (status 143/130) when SIGTERM or
    Ctrl-C stopped the run (after saving a checkpoint when it was training); a
    `workdir.WorkdirError` when the workdir is held by another run, was trained with another
    config, or a write failed for lack of space; `NonFiniteError` on NaN/inf. `force_new` deletes
    the workdir's previous run and starts over.
    """
    sharding.initialize_distributed()
    config = configs.complete(config)
    validate_config(config)
    mesh = sharding.make_mesh(num_devices, config.mesh.fsdp)
    rules = sharding.ShardingRules.from_config(config.mesh)
    sharding.check_batch_size(config.train.batch_size, mesh)
    wd = workdir_lib.Workdir(workdir, is_main=jax.process_index() == 0)
    with wd.locked(), _StopFlag() as stop:
        try:
            return _train_and_evaluate(config, wd, mesh, rules, stop, force_new)
        except Exception as e:
            if workdir_lib.is_disk_full(e) and not isinstance(e, workdir_lib.DiskFull):
                raise _disk_full_error(e, wd) from None
            raise


def _disk_full_error(e: BaseException, wd: workdir_lib.Workdir) -> workdir_lib.DiskFull:
    """What failed and what is intact, in a few lines."""
    ckpts = os.listdir(wd.checkpoints) if os.path.isdir(wd.checkpoints) else []
    steps = sorted(int(n) for n in ckpts if n.isdigit())
    intact = (f"checkpoints of steps {steps} (the run resumes from step {steps[-1]})" if steps
              else "no checkpoint yet (the run starts from step 0)")
    last_row = workdir_lib.last_metrics_step(wd.metrics_path)
    if last_row is not None:
        intact += f"; metrics.jsonl through step {last_row}"
    detail = next((f" ({x.strerror})" for x in (e, e.__cause__) if isinstance(x, OSError) and x.strerror
                   and x.strerror != os.strerror(errno.ENOSPC)), "")
    return workdir_lib.DiskFull(
        f"no space left on {workdir_lib.failed_path(e, wd.path)}{detail}; the run stopped at this first "
        f"failed write. Intact in {wd.path}: {intact}. Free space on that disk and re-run the same command to resume.")


def _train_and_evaluate(config, wd: workdir_lib.Workdir, mesh, rules, stop: _StopFlag, force_new: bool) -> dict:
    is_main = wd.is_main
    objective = objectives.build(config)  # a teacher run's architecture is adopted into `config` here
    objective.cache = eval_cache.ResultCache(wd.cache, writes=is_main)
    trajectory = tuple(objective.trajectory_fields)
    if config.train.lr_schedule != "constant":  # the learning rate depends on how long the run trains
        trajectory += ("train.num_steps",)
    changes, error = {}, None
    if is_main:
        try:
            if force_new:
                wd.start_over()
            changes = wd.check_config(config, trajectory)
        except workdir_lib.WorkdirError as e:
            error = e
    wd.agree(error)
    tc = config.train
    num_steps = int(tc.num_steps)

    key = jax.random.PRNGKey(tc.seed)
    init_key, eval_key = jax.random.split(key)
    placement, frozen = placement_lib.on_mesh(objective, init_key, mesh, rules)
    _log(is_main, placement.describe())

    ckpt = ckpt_lib.Checkpointer(wd.checkpoints, keep=tc.keep_checkpoints, save_every=tc.checkpoint_every,
                                 save_every_secs=tc.checkpoint_every_secs)
    writer, ok = None, False
    try:
        restored = ckpt.restore_latest(placement.abstract_state)
        start = 0
        if restored is not None:
            state, start = restored
            _log(is_main, f"resumed from {wd.checkpoints} at step {start}")
        else:
            state = placement.init_state(objective, init_key, frozen)
        if objective.init_only:  # needed to create the state only: free their device memory
            placement = placement.without_frozen(objective.init_only)
            frozen = {k: v for k, v in frozen.items() if k not in objective.init_only}
        wd.record(config, changes, start, trajectory)

        results = wd.read_results()
        if start >= num_steps and results is not None and results.get("step") == start:
            stale = wd.stale_evaluation(results, config, trajectory)
            if not stale:
                _log(is_main, f"already trained to step {start}; results in {wd.results_path}")
                ok = True
                return results
            changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in stale.items())
            _log(is_main, f"evaluation settings changed since results.json ({changed}): re-evaluating step {start}")
        # Training changes the workdir from here on: its results no longer describe it until the end.
        # A re-evaluation keeps results.json and its evaluation row until the new evaluation replaces
        # them, so one that is interrupted loses nothing.
        evaluate_again = start >= num_steps
        if not evaluate_again:
            wd.prepare_to_continue(start, evaluate_again=False)

        writer = MetricWriter(wd.path, is_main)
        pidx, pcount = jax.process_index(), jax.process_count()
        step = start
        if step < num_steps:
            batch = sharding.shard_batch(objective.batch(step, pidx, pcount), mesh)
            t0 = time.perf_counter()
            compiled = placement.jit_step(objective).lower(state, frozen, batch).compile()
            _log(is_main, f"compiled the {objective.name} step in {time.perf_counter() - t0:.1f}s; "
                 + _describe_compiled(compiled))

        stop_signal = 0
        with tqdm(total=num_steps, initial=step, disable=not is_main, mininterval=2.0,
                  desc=objective.name, dynamic_ncols=True) as bar:
            t_log, step_log = time.perf_counter(), step
            in_flight = collections.deque()
            stop.deferred = step < num_steps  # from the first step on, a signal first saves
            while step < num_steps:
                if step > start:
                    batch = sharding.shard_batch(objective.batch(step, pidx, pcount), mesh)
                state, metrics = compiled(state, frozen, batch)
                in_flight.append(metrics)
                if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                    jax.block_until_ready(in_flight.popleft())
                step += 1
                bar.update(1)
                stop_signal = stop.signum  # read once: the signal may arrive at any moment
                time_due = ckpt.time_due()
                if pcount > 1:
                    # All processes must stop and save at the same step, or the others block forever
                    # in the next step's collectives: agree on log steps (already host-synchronous).
                    if step % tc.log_every == 0:
                        stop_signal, due = sharding.maxima_over_processes((stop_signal, int(time_due)))
                        time_due = bool(due)
                    else:
                        stop_signal, time_due = 0, False
                save_now = ckpt.should_save(step) or time_due or step == num_steps or stop_signal
                if step % tc.log_every == 0 or save_now:
                    ckpt.raise_if_failed()  # a background save that failed stops the run before more writes
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
                if stop_signal:
                    break
                if tc.eval_every and step % tc.eval_every == 0 and step < num_steps:
                    _evaluate(objective, state, frozen, eval_key, step, writer, wd.plots, is_main)
        ckpt.wait()
        stop.deferred = False
        stop_signal = stop_signal or stop.signum
        if stop_signal:
            name = signal.Signals(stop_signal).name
            message = f"stopped by {name}: saved step {step}; re-running the same command resumes"
            _log(is_main, message)
            raise Stopped(stop_signal, message, step=step, saved=True)
        replace_old = (lambda: wd.prepare_to_continue(start, evaluate_again=True)) if evaluate_again else None
        results = _evaluate(objective, state, frozen, eval_key, step, writer, wd.plots, is_main, replace_old)
        results["step"] = step
        results["evaluated_with"] = workdir_lib.evaluation_settings(config, trajectory)
        wd.write_results({k: _jsonable(v) for k, v in results.items()})
        _log(is_main, "results: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()
                                              if isinstance(v, (int, float))))
        ok = True
        return results
    finally:
        ckpt.close(quiet=not ok)
        if writer is not None:
            writer.close(quiet=not ok)


def _evaluate(objective, state, frozen, key, step, writer, plot_dir, is_main, before_write=None) -> dict[str, float]:
    """Runs the objective's evaluation on the mesh: the state and frozen networks stay where they
    are (sharded leaves are not gathered; samplers run on the mesh and their outputs come to the
    host, `denoiser.sample_in_chunks`). Every process computes the same numbers and draws the
    plots (drawing may sample on the mesh, which every process must join); process 0 writes them,
    the others draw into a scratch directory that is removed. `before_write` (if given) runs once
    the metrics are computed, before anything is written: a re-evaluation drops the old ones there."""
    t0 = time.perf_counter()
    metrics = {k: float(v) for k, v in objective.evaluate(state, frozen, key).items()}
    metrics["eval_seconds"] = time.perf_counter() - t0
    if before_write is not None:
        before_write()
    writer.write(step, metrics, prefix="eval/")
    if is_main:
        objective.plot(state, frozen, plot_dir, step)
    else:
        with tempfile.TemporaryDirectory(prefix="fdistill_plots_") as scratch:
            objective.plot(state, frozen, scratch, step)
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
