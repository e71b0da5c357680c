"""A run's workdir never lies about what it holds.

`fdistill.train.train_and_evaluate` keeps these files in a workdir (only process 0 writes):

  run.lock       present while a run holds the workdir: its host, pid, start time and command
  config.json    the completed config of the run's first invocation (never rewritten)
  runs.jsonl     one row per invocation: time, host, pid, command, the step it started from, the
                 fields it changed relative to config.json and a fingerprint of the fixed fields
  checkpoints/   Orbax steps; a step that fails to restore is renamed `<step>.corrupt`
  metrics.jsonl  one training row per logged step (and one `eval/` row per evaluation); rows after
                 the step a run resumes from are dropped before it trains
  results.json   the final evaluation of the latest checkpoint, with `step` and the evaluation
                 settings it used (`evaluated_with`); removed as soon as a run trains, so a workdir
                 with results.json is a finished run; a re-evaluation replaces it (and its metrics
                 row) only once the new evaluation is computed, so an interrupted one loses nothing
  tb/, plots/    TensorBoard events, figures
  cache/         evaluation results that are pure functions of their inputs, e.g. a frozen teacher's
                 sample metrics (`fdistill.evaluation.cache`), reused by later invocations

A resumed run must have the config that trained the checkpoints: every field except those in
`MAY_CHANGE` (how long it trains, how often it logs, evaluates and saves, where inputs are found)
and `EVALUATION_ONLY` (a change re-evaluates instead of being refused) must equal config.json's,
compared after `configs.complete`, so a config.json written before a field existed matches when the
field has its default. Anything else is refused before anything is written, naming every differing
field; `--force_new` (or a new workdir) starts over.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
from typing import Any, Iterator

from fdistill import configs

# Fields a resumed run may change: they change neither what is trained nor how it is evaluated.
MAY_CHANGE = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.checkpoint_every_secs",
    "train.keep_checkpoints",
    # where inputs are found and what may be read, not what they are
    "data.data_dir", "data.allow_download", "distill.allow_unfinished_teacher",
    "po.data_dir", "pairs.dir",
    "mesh.*",  # how the arrays are laid out over the devices (checkpoints restore onto any mesh)
)
# Fields that only change the evaluation: a resumed run with other values re-evaluates the latest
# checkpoint (results.json is rewritten). An objective whose training reads one of them names it
# in its `trajectory_fields` (knowledge distillation regresses the eval sampler's endpoints).
EVALUATION_ONLY = ("eval.*", "distill.ratio_eval_sigma_min", "distill.ratio_eval_sigma_max",
                   "data.num_reference", "data.feature_fn")

LOCK = "run.lock"
STARTING_OVER = "--force_new (train_and_evaluate(..., force_new=True)) deletes everything in it and starts over"


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; the message says why and what to do. `exit_code` is the
    CLI's exit status."""

    exit_code = 1


class WorkdirLocked(WorkdirError):
    """Another run holds the workdir."""


class ConfigMismatch(WorkdirError):
    """The config differs from the one that trained the workdir's checkpoints."""

    exit_code = 2


class DiskFull(WorkdirError):
    """A write into the workdir failed for lack of space."""


# ----- files ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Makes the OSErrors of the block name `path` (a failed write to an open file says only
    "No space left on device")."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, path) from e


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temporary file + rename)."""
    tmp = path + ".tmp"
    try:
        with naming(path), open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a half-written file (disk full, an object that is not JSON)
        raise


def append_jsonl(path: str, row: dict) -> None:
    with naming(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_evaluation_row(row: dict) -> bool:
    """A metrics.jsonl row written by an evaluation (all its metrics are `eval/...`)."""
    return all(k == "step" or k.startswith("eval/") for k in row)


def last_metrics_step(path: str) -> int | None:
    """The step of the last readable row of metrics.jsonl (None without one)."""
    last = None
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    last = int(json.loads(line)["step"])
    return last


def trim_metrics(path: str, step: int, drop_evaluation_at_step: bool = False) -> int:
    """Drops the rows of metrics.jsonl after `step` (and the evaluation rows at `step` when it is
    evaluated again, and a last row cut short by a crash), atomically; returns how many."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        s = int(row.get("step", 0))
        if s < step or (s == step and not (drop_evaluation_at_step and is_evaluation_row(row))):
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


# ----- the lock ------------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _command() -> str:
    return " ".join(shlex.quote(a) for a in sys.argv)


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a run that has not yet written its name"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
            f"({holder.get('command', '?')})")


class Lock:
    """An exclusive lock on a workdir: `<workdir>/run.lock`, `flock`ed for the whole run and naming
    its holder. The kernel releases a `flock` when its process dies, even by kill -9, so a lock
    file found unlocked on this host is stale and is taken over with a warning; one that names
    another host is refused (this host cannot tell whether that run is alive)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise WorkdirLocked(f"{os.path.dirname(self.path)} is in use by {describe_holder(holder)}; "
                                    "wait for that run to end (or stop it), or use another --workdir") from None
            try:  # the holder may have released (and removed) the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._read(fd)
        if previous and previous.get("host") != socket.gethostname():
            os.close(fd)
            raise WorkdirLocked(f"{self.path} names a run on another host ({describe_holder(previous)}); this host "
                                f"cannot tell whether it is still running. If it is not, delete {self.path}")
        if previous:
            print(f"WARNING: took over the stale lock {self.path} of {describe_holder(previous)}: that process "
                  "no longer holds it (it ended without releasing it, e.g. killed)", flush=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": utc_now(), "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            return json.loads(os.pread(fd, 65536, 0).decode() or "null")
        except ValueError:
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self._fd)  # closing releases the flock
        self._fd = None


# ----- the config ----------------------------------------------------------------------------------


def flatten(config) -> dict[str, Any]:
    """Dotted field names (`data.num_modes`) -> JSON values of a config."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config)), "")
    return out


def _matches(field: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(field, p) for p in patterns)


def kind_of(field: str, trajectory_fields=()) -> str:
    """'fixed' (must match on resume), 'may_change' or 'evaluation' (see the module docstring)."""
    if field in trajectory_fields:
        return "fixed"
    if _matches(field, MAY_CHANGE):
        return "may_change"
    return "evaluation" if _matches(field, EVALUATION_ONLY) else "fixed"


def evaluation_settings(config, trajectory_fields=()) -> dict[str, Any]:
    """The config's evaluation-only fields (recorded in results.json as `evaluated_with`)."""
    return {k: v for k, v in flatten(config).items() if kind_of(k, trajectory_fields) == "evaluation"}


def fingerprint(config, trajectory_fields=()) -> str:
    """A short hash of the fields that must match on resume."""
    fixed = {k: v for k, v in flatten(config).items() if kind_of(k, trajectory_fields) == "fixed"}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


_ABSENT = "<absent>"


def differences(stored, current) -> dict[str, tuple[Any, Any]]:
    """{field: (stored value, current value)} of every field that differs."""
    a, b = flatten(stored), flatten(current)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


# ----- disk full -----------------------------------------------------------------------------------

def says_disk_full(text: str) -> bool:
    """Whether an error message reports a write that failed for lack of space (TensorStore says
    RESOURCE_EXHAUSTED for a failed write; for memory it says 'Out of memory')."""
    return ("No space left on device" in text or "Disk quota exceeded" in text
            or re.search(r"RESOURCE_EXHAUSTED: .*[Ww]rit", text) is not None)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a failed write for lack of space:
    ENOSPC/EDQUOT, or TensorStore's RESOURCE_EXHAUSTED inside Orbax."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if says_disk_full(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def failed_path(exc: BaseException, default: str) -> str:
    """The file whose write failed, when the error names it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.filename:
            return str(exc.filename)
        m = re.search(r'(?:local file|writing) "([^"]+)"', str(exc))
        if m:
            return m.group(1)
        exc = exc.__cause__ or exc.__context__
    return default


# ----- the workdir ---------------------------------------------------------------------------------


class Workdir:
    """The files of one run's workdir (see the module docstring). Only `is_main` (process 0) writes;
    errors found by process 0 are raised in every process (`agree`)."""

    def __init__(self, path: str, is_main: bool = True):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.is_main = is_main
        self.config_path = os.path.join(self.path, "config.json")
        self.history_path = os.path.join(self.path, "runs.jsonl")
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        self.results_path = os.path.join(self.path, "results.json")
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.plots = os.path.join(self.path, "plots")
        self.cache = os.path.join(self.path, "cache")
        self._lock = Lock(self.path)

    @staticmethod
    def agree(error: BaseException | None) -> None:
        """Raises `error` in the process that found it and a pointer to it in the others, so that
        every process stops together (a collective with several processes)."""
        from fdistill import sharding

        if sharding.any_process(error is not None):
            raise error or WorkdirError("process 0 stopped the run; see its log")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the workdir's lock (process 0) for the block; every process fails at once when the
        lock is held by another run."""
        error = None
        if self.is_main:
            try:
                self._lock.acquire()
            except WorkdirError as e:
                error = e
        self.agree(error)
        try:
            yield
        finally:
            if self.is_main:
                self._lock.release()

    def start_over(self) -> None:
        """Deletes everything in the workdir except the lock (`--force_new`)."""
        if not self.is_main or not os.path.isdir(self.path):
            return
        names = sorted(n for n in os.listdir(self.path) if n != LOCK)
        for name in names:
            p = os.path.join(self.path, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        if names:
            print(f"[fdistill] --force_new: deleted the previous run in {self.path} ({', '.join(names)})", flush=True)

    def has_run_files(self) -> bool:
        ckpts = os.listdir(self.checkpoints) if os.path.isdir(self.checkpoints) else []
        steps = any(n.split(".")[0].isdigit() for n in ckpts)
        return steps or os.path.exists(self.metrics_path) or os.path.exists(self.results_path)

    def check_config(self, config, trajectory_fields=()) -> dict[str, tuple[Any, Any]]:
        """The fields `config` changes relative to config.json (allowed ones only); ConfigMismatch
        naming every field that must match but differs (or when config.json is missing or unreadable
        while the workdir holds a run). Writes nothing."""
        if not os.path.exists(self.config_path):
            if self.has_run_files():
                raise ConfigMismatch(f"{self.path} holds checkpoints or metrics but no config.json, so nothing tells "
                                     f"what trained them; restore its config.json, or {STARTING_OVER}")
            return {}
        try:
            stored = configs.load_json(self.config_path)
        except (ValueError, configs.ConfigError) as e:
            raise ConfigMismatch(f"{self.config_path} is not a readable config ({e}); restore it, or "
                                 f"{STARTING_OVER}") from None
        diff = differences(stored, config)
        fixed = {k: v for k, v in diff.items() if kind_of(k, trajectory_fields) == "fixed"}
        if fixed:
            lines = [f"  config.{k}: {a!r} in config.json, {b!r} now" for k, (a, b) in fixed.items()]
            raise ConfigMismatch(
                f"{self.path} was trained with another config; these fields change what is trained and must "
                "match its config.json:\n" + "\n".join(lines) + "\nNothing was written. Use a new --workdir, or "
                + STARTING_OVER + ".")
        return diff

    def record(self, config, changes: dict, start_step: int, trajectory_fields=()) -> None:
        """Writes config.json (first invocation only) and appends this invocation to runs.jsonl."""
        if not self.is_main:
            return
        os.makedirs(self.plots, exist_ok=True)
        if not os.path.exists(self.config_path):
            write_json(self.config_path, config.to_dict())
        append_jsonl(self.history_path, {
            "time": utc_now(), "host": socket.gethostname(), "pid": os.getpid(), "command": _command(),
            "start_step": start_step, "changes": {k: list(v) for k, v in changes.items()},
            "fingerprint": fingerprint(config, trajectory_fields)})

    def read_results(self) -> dict | None:
        return read_json(self.results_path)

    def stale_evaluation(self, results: dict, config, trajectory_fields=()) -> dict[str, tuple[Any, Any]]:
        """{field: (evaluated with, now)} of the evaluation settings that changed since `results`
        (a results.json without `evaluated_with` was evaluated with config.json's settings). A field
        recorded there that is no longer an evaluation setting (e.g. `eval.num_steps`, one of
        `trajectory_fields` once `distill.lambda_reg` trains on the teacher's samples) is compared
        by the resume check instead, and does not make a finished run evaluate again."""
        before = results.get("evaluated_with")
        if before is None:
            stored = configs.load_json(self.config_path) if os.path.exists(self.config_path) else config
            before = evaluation_settings(stored, trajectory_fields)
        now = evaluation_settings(config, trajectory_fields)
        return {k: (before.get(k, _ABSENT), now.get(k, _ABSENT)) for k in sorted(set(before) | set(now))
                if kind_of(k, trajectory_fields) == "evaluation" and before.get(k, _ABSENT) != now.get(k, _ABSENT)}

    def prepare_to_continue(self, step: int, evaluate_again: bool) -> None:
        """Before a run trains from `step`, or once its new evaluation of `step` is computed
        (`evaluate_again`, which also drops the old evaluation rows at `step`): results.json no
        longer describes the workdir and metrics rows after `step` are dropped."""
        if not self.is_main:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.results_path)
        dropped = trim_metrics(self.metrics_path, step, drop_evaluation_at_step=evaluate_again)
        if dropped:
            what = f"after step {step}" + (" and its evaluation" if evaluate_again else "")
            print(f"[fdistill] dropped {dropped} metrics.jsonl row(s) that this run writes again ({what})", flush=True)

    def write_results(self, results: dict) -> None:
        if self.is_main:
            write_json(self.results_path, results)
