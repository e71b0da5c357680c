"""A run's workdir never lies about what it holds (`fdistill.workdir`), one test per case of the issue
"Workdir integrity": changed configs (1), corrupt checkpoints (2), the lock (3), Ctrl-C (4), one
metrics row per step (5), clear errors (6), teachers (7), and table scripts that stop when told to.
Subprocesses where signals or two processes are involved."""
import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fdistill import checkpoint, configs, objectives, train, workdir
from tests.helpers import REPO, cli_env, score_cli, tiny_distill_config, tiny_score_config

TIMEOUT_S = 120


def read_rows(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_steps(wd):
    """The steps of the training rows of metrics.jsonl, in order."""
    return [r["step"] for r in read_rows(wd) if "loss" in r]


def snapshot(wd):
    """{relative path: bytes} of every file under `wd`."""
    out = {}
    for root, _, files in os.walk(wd):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, wd)] = f.read()
    return out


def wait_for_rows(wd, n, proc):
    """Waits until `wd`'s metrics.jsonl has `n` rows (the run in `proc` is training)."""
    path, deadline = os.path.join(wd, "metrics.jsonl"), time.time() + TIMEOUT_S
    while not (os.path.exists(path) and len(open(path).readlines()) >= n):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.2)


def long_run(wd, **train_fields):
    """The CLI command of a tiny gmm_score run that would train for hours."""
    return score_cli(wd, tiny_score_config(1_000_000, checkpoint_every=1_000_000, **train_fields))


# ----- 1. changed configs -----------------------------------------------------------------------------


def test_a_changed_config_is_refused_naming_every_field_before_anything_is_written(tmp_path):
    wd = str(tmp_path / "run")
    train.train_and_evaluate(tiny_score_config(10), wd)
    before = snapshot(wd)
    cases = [({"data.num_modes": 4, "data.imbalance": 5.0},
              ["config.data.num_modes: 8 in config.json, 4 now", "config.data.imbalance: 1.0 in config.json, 5.0 now"]),
             ({"train.batch_size": 128, "train.seed": 1},
              ["config.train.batch_size: 64 in config.json, 128 now", "config.train.seed: 0 in config.json, 1 now"]),
             ({"model.width": 64}, ["config.model.width: 32 in config.json, 64 now"])]
    for changes, lines in cases:
        c = tiny_score_config(20)
        for field, value in changes.items():
            section, name = field.split(".")
            c[section][name] = value
        with pytest.raises(workdir.ConfigMismatch) as e:
            train.train_and_evaluate(c, wd)
        for line in lines:
            assert line in str(e.value), str(e.value)
        assert "--force_new" in str(e.value) and "Nothing was written" in str(e.value)
        assert snapshot(wd) == before, f"{changes} changed the workdir"

    # --force_new is how a user starts over: the old run is gone, the new config is recorded.
    c = tiny_score_config(10)
    c.model.width = 64
    assert train.train_and_evaluate(c, wd, force_new=True)["step"] == 10
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["model"]["width"] == 64
    assert train_steps(wd) == list(range(1, 11))
    assert len(open(os.path.join(wd, "runs.jsonl")).readlines()) == 1


def test_allowed_changes_are_recorded_and_evaluation_changes_reevaluate(tmp_path, capsys):
    wd = str(tmp_path / "run")
    train.train_and_evaluate(tiny_score_config(10), wd)
    # Longer, with other logging and checkpoint cadences: allowed, recorded, config.json unchanged.
    assert train.train_and_evaluate(tiny_score_config(20, log_every=2, checkpoint_every=5), wd)["step"] == 20
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 10
    history = [json.loads(line) for line in open(os.path.join(wd, "runs.jsonl"))]
    assert [h["start_step"] for h in history] == [0, 10]
    assert history[1]["changes"] == {"train.num_steps": [10, 20], "train.log_every": [1, 2],
                                     "train.checkpoint_every": [10, 5]}
    assert history[0]["fingerprint"] == history[1]["fingerprint"] and history[1]["pid"] == os.getpid()
    steps = train_steps(wd)

    # An evaluation setting: the latest checkpoint is evaluated again, nothing is trained.
    c = tiny_score_config(20, log_every=2, checkpoint_every=5)
    c.eval.num_samples = 512
    capsys.readouterr()
    results = train.train_and_evaluate(c, wd)
    assert "eval.num_samples: 256 -> 512): re-evaluating step 20" in capsys.readouterr().out
    assert results["evaluated_with"]["eval.num_samples"] == 512
    assert train_steps(wd) == steps
    assert [r["step"] for r in read_rows(wd) if "eval/mmd" in r] == [10, 20]  # the step-20 evaluation replaced

    # A config.json written before a field existed matches a config where it has its default.
    path = os.path.join(wd, "config.json")
    with open(path) as f:
        old = json.load(f)
    del old["train"]["grad_accum_steps"]
    workdir.write_json(path, old)
    train.train_and_evaluate(c, wd)
    assert "already trained to step 20" in capsys.readouterr().out


def test_an_interrupted_re_evaluation_keeps_the_old_results(tmp_path, monkeypatch):
    """Ctrl-C while a finished run is evaluated again (an evaluation setting changed) leaves its
    results.json and final evaluation row as they were; the re-run evaluates and replaces them."""
    wd = str(tmp_path / "run")
    train.train_and_evaluate(tiny_score_config(10), wd)
    before = snapshot(wd)
    c = tiny_score_config(10)
    c.eval.num_samples = 512
    cls = type(objectives.build(c))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cls, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(c, wd)
    after = snapshot(wd)
    for name in ("results.json", "metrics.jsonl", "config.json"):
        assert after[name] == before[name], name
    assert json.loads(after["results.json"])["evaluated_with"]["eval.num_samples"] == 256

    results = train.train_and_evaluate(c, wd)
    assert results["evaluated_with"]["eval.num_samples"] == 512
    with open(os.path.join(wd, "results.json")) as f:
        assert json.load(f)["evaluated_with"]["eval.num_samples"] == 512
    assert [r["step"] for r in read_rows(wd) if "eval/mmd" in r] == [10]  # replaced, not added


def test_a_setting_that_became_a_trajectory_field_does_not_evaluate_a_finished_run_again(tmp_path):
    """A results.json written when `eval.num_steps` was an evaluation setting (before
    `distill.lambda_reg` made it part of what is trained) is not stale because that field is now a
    trajectory field; a real evaluation change is still reported."""
    c = tiny_score_config(10)
    wd = workdir.Workdir(str(tmp_path))
    results = {"evaluated_with": workdir.evaluation_settings(c)}
    assert "eval.num_steps" in results["evaluated_with"]
    assert wd.stale_evaluation(results, c, ("eval.num_steps",)) == {}
    c.eval.num_samples = 2 * c.eval.num_samples
    assert list(wd.stale_evaluation(results, c, ("eval.num_steps",))) == ["eval.num_samples"]


# ----- 2 and 5. corrupt checkpoints, one metrics row per step ------------------------------------------


def test_a_corrupt_checkpoint_is_set_aside_saved_again_and_not_retrained(tmp_path, capsys):
    wd = str(tmp_path / "run")
    train.train_and_evaluate(tiny_score_config(20), wd)  # checkpoints 10 and 20
    for path in glob.glob(os.path.join(wd, "checkpoints", "20", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:  # a truncated write: the array data files are cut in half
            f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    assert train.train_and_evaluate(tiny_score_config(20), wd)["step"] == 20  # falls back to 10, trains 11..20
    out = capsys.readouterr().out
    train.train_and_evaluate(tiny_score_config(20), wd)
    assert "already trained to step 20" in capsys.readouterr().out  # the second re-run does not retrain
    assert train_steps(wd) == list(range(1, 21))  # one row per step after the fallback
    assert os.path.isdir(os.path.join(wd, "checkpoints", "20.corrupt"))
    assert int(checkpoint.restore_tree(wd)["step"]) == 20  # step 20 was written again
    warnings = [line for line in out.splitlines() if "WARNING: checkpoint" in line]
    assert len(warnings) == 1 and len(warnings[0]) < 600, out[-3000:]
    assert "20.corrupt" in warnings[0] and "falling back to the previous checkpoint (step 10)" in warnings[0]
    assert "TensorStore" not in warnings[0]


def test_kill_9_then_resume_keeps_one_metrics_row_per_step_and_takes_over_the_stale_lock(tmp_path):
    wd = str(tmp_path / "run")
    cmd = score_cli(wd, tiny_score_config(1_000_000, checkpoint_every=10))
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_rows(wd, 25, proc)
    finally:
        proc.kill()  # kill -9: no cleanup, the lock file stays behind
        proc.communicate()
    lock = os.path.join(wd, workdir.LOCK)
    left_behind = json.load(open(lock)) if os.path.exists(lock) else None
    cmd[cmd.index("--config.train.num_steps=1000000")] = "--config.train.num_steps=30"
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert train_steps(wd) == list(range(1, 31))
    assert left_behind is not None and left_behind["pid"] == proc.pid
    assert f"took over the stale lock {lock} of pid {proc.pid}" in log
    assert not os.path.exists(lock)


# ----- 3 and 4. the lock, Ctrl-C -----------------------------------------------------------------------


def test_a_locked_workdir_refuses_a_second_run_and_ctrl_c_saves_and_exits_130(tmp_path):
    wd = str(tmp_path / "run")
    cmd = long_run(wd, log_every=10)
    first = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_rows(wd, 2, first)
        second = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"{wd} is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = first.communicate(timeout=TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, out[-3000:]
    saved = int(checkpoint.restore_tree(wd)["step"])
    assert f"stopped by SIGINT: saved step {saved}" in out and "Traceback" not in out
    assert train_steps(wd) == sorted(set(range(10, saved + 1, 10)) | {saved})  # one writer: no interleaved rows
    assert not os.path.exists(os.path.join(wd, workdir.LOCK))


def test_a_signal_stops_at_once_outside_the_loop_and_a_second_ctrl_c_aborts(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    with train._StopFlag() as stop:
        with pytest.raises(train.Stopped) as e:  # nothing unsaved: SIGTERM stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert e.value.code == 143 and not e.value.saved
        stop.deferred = True  # in the loop: the first Ctrl-C asks for a checkpoint, a repeated SIGTERM is ignored
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGINT
        with pytest.raises(train.Stopped) as e:  # the second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert e.value.code == 130 and "second Ctrl-C" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is previous


# Compiles for seconds under `_StopFlag` while timers send SIGNALS = [(seconds, signal), ...]: the
# function is traced and lowered first, so the signals land in XLA's compilation, which is started
# explicitly (AOT, as the train step is) or by the first call (as the evaluation's functions are).
COMPILE_UNDER_SIGNALS = """
import os, signal, threading, time, jax, jax.numpy as jnp
from fdistill import train

def chain(x):  # thousands of ops: seconds of XLA compilation
    for i in range(6000):
        x = jnp.sin(x) * 1.0001 + i
    return x

with train._StopFlag() as stop:
    stop.deferred = DEFERRED
    jitted = jax.jit(chain)
    lowered = jitted.lower(jnp.ones(3))  # a later call reuses this trace and lowering
    for delay, sig in SIGNALS:
        threading.Timer(delay, os.kill, (os.getpid(), sig)).start()
    t0 = time.perf_counter()
    lowered.compile() if AOT else jitted(jnp.ones(3))
    time.sleep(1.0)  # the stop comes within train.POLL_SECONDS of the compilation's end
    print("not stopped", time.perf_counter() - t0)
"""


@pytest.mark.parametrize("aot", [True, False], ids=["aot", "first_call"])
def test_a_signal_during_compilation_stops_once_xla_has_finished_without_a_crash(aot):
    """JAX lets a signal interrupt the wait for a compilation while XLA goes on compiling in its own
    thread; a process that then exits dies of a segmentation fault (status 139). Under `_StopFlag`
    a signal that lands in a compilation waits for it, and the status is 143."""
    out, status = compile_with_signals("[(0.5, signal.SIGTERM)]", aot=aot)
    assert "SIGTERM: stopping once XLA has finished compiling" in out, out[-3000:]  # it arrived while compiling
    assert status == 143 and "stopped by SIGTERM after compiling" in out, out[-3000:]
    assert "not stopped" not in out and "Fatal Python error" not in out


def test_a_second_ctrl_c_during_compilation_exits_130_at_once():
    out, status = compile_with_signals("[(0.5, signal.SIGINT), (1.0, signal.SIGINT)]")
    assert "SIGINT: stopping once XLA has finished compiling" in out, out[-3000:]
    assert status == 130 and "aborted by a second Ctrl-C while compiling" in out, out[-3000:]
    assert "not stopped" not in out and "Fatal Python error" not in out


def test_in_the_loop_a_second_ctrl_c_during_a_compilation_exits_130_at_once():
    """In the loop (a mid-run evaluation's compilation) the first Ctrl-C asks for a checkpoint; a second
    one aborts without saving, and inside a compilation it exits at once instead of unwinding."""
    out, status = compile_with_signals("[(0.5, signal.SIGINT), (1.0, signal.SIGINT)]", deferred=True)
    assert "Ctrl-C: saving a checkpoint at the next step" in out, out[-3000:]
    assert status == 130 and "aborted by a second Ctrl-C without saving" in out, out[-3000:]
    assert "not stopped" not in out and "Fatal Python error" not in out


def compile_with_signals(signals: str, aot: bool = True, deferred: bool = False) -> tuple[str, int]:
    """Runs COMPILE_UNDER_SIGNALS with SIGNALS = `signals`; returns (stdout + stderr, exit status)."""
    env = dict(cli_env(), JAX_ENABLE_COMPILATION_CACHE="false")  # a cached executable would not compile
    header = f"import signal\nSIGNALS = {signals}\nAOT = {aot}\nDEFERRED = {deferred}\n"
    proc = subprocess.run([sys.executable, "-c", header + COMPILE_UNDER_SIGNALS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.stdout + proc.stderr, proc.returncode


# ----- 6. clear errors -----------------------------------------------------------------------------------


def test_a_full_disk_stops_at_the_first_failed_write_with_a_short_message(tmp_path):
    """A real full disk: a 4 MiB tmpfs mounted in a user+mount namespace (`unshare`), filled up by a
    file after a first run saved its step-10 checkpoint; the resumed run cannot save step 20."""
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("unshare (user and mount namespaces) is not available to mount a small tmpfs")
    mnt, wd = str(tmp_path / "mnt"), str(tmp_path / "mnt" / "run")
    os.makedirs(mnt)
    first, resumed = (shlex.join(score_cli(wd, tiny_score_config(n))) for n in (10, 40))
    fill = f"s = os.statvfs('{mnt}'); open('{mnt}/filler', 'wb').write(bytes(s.f_bavail * s.f_frsize - 65536))"
    script = (f"mount -t tmpfs -o size=4m tmpfs {mnt} && {first} > {tmp_path}/first.log 2>&1 && "
              f"{sys.executable} -c \"import os; {fill}\" && {{ {resumed}; echo status=$?; }} && "
              f"echo checkpoints: $(ls {wd}/checkpoints) && echo last row: $(tail -n 1 {wd}/metrics.jsonl)")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                         env=cli_env(), capture_output=True, text=True, timeout=2 * TIMEOUT_S)
    log = out.stdout + out.stderr
    assert "status=1" in log, log[-3000:] + open(tmp_path / "first.log").read()[-2000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log[-3000:]
    error = errors[0]
    assert error.startswith(f"error: no space left on {wd}/checkpoints (saving step 20 needs about ")
    assert "Intact in" in error and "checkpoints of steps [10] (the run resumes from step 10)" in error
    assert "Traceback" not in log and len(log.splitlines()) < 20, log[-3000:]
    assert "checkpoints: 10\n" in log  # no half-written step 20 left behind
    last_row = next(line for line in log.splitlines() if line.startswith("last row: "))
    assert json.loads(last_row[len("last row: "):])["step"] == 20  # nothing written after the failed save


def test_a_corrupt_arrayrecord_file_is_named_with_its_split_and_how_to_regenerate_it(tmp_path):
    from fdistill.data import diffusion_preference, digits, preference, tfds_build

    def cut(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    def flip(path):  # one bit-flipped byte of data (not of the zero padding)
        with open(path, "r+b") as f:
            data = np.frombuffer(f.read(), np.uint8).copy()
            nonzero = np.flatnonzero(data)
            data[nonzero[len(nonzero) // 3]] ^= 0xFF
            f.seek(0)
            f.write(data.tobytes())

    data_dir = str(tmp_path / "digits")
    folder = str(digits.build_dataset(data_dir).data_dir)
    train_file = glob.glob(os.path.join(folder, "*-train.array_record*"))[0]
    for damage in (cut, flip):
        shutil.copy(train_file, train_file + ".good")
        damage(train_file)
        with pytest.raises(tfds_build.CorruptDataError) as e:
            digits.load_split(data_dir, "train")
        assert str(e.value).startswith(f"{train_file} (split 'train') is corrupt: Corrupted Riegeli"), str(e.value)
        assert f"To regenerate it: delete {folder} and re-run the same command" in str(e.value)
        os.replace(train_file + ".good", train_file)
    assert len(digits.load_split(data_dir, "train")[0]) == digits.NUM_TRAIN  # the intact file reads

    pairs = {"index": np.arange(8), "x_w": np.zeros((8, 2), np.float32), "x_l": np.ones((8, 2), np.float32),
             "reward_w": np.ones(8, np.float32), "reward_l": np.zeros(8, np.float32), "p_label": np.ones(8, np.float32)}
    pair_dir = diffusion_preference.write_pairs(str(tmp_path / "pairs"), "p0", pairs)
    cut(glob.glob(os.path.join(pair_dir, "*-train.array_record*"))[0])  # a small file cut short reads as Nones
    with pytest.raises(tfds_build.CorruptDataError, match=r"\(split 'train'\) is corrupt: .*To regenerate it: delete"):
        diffusion_preference.read_pairs(str(tmp_path / "pairs"), "p0", (2,))

    record = {"index": 0, "prompt": np.array([1, 5, 6, 2], np.int32), "chosen": np.array([7], np.int32),
              "rejected": np.array([8], np.int32), "reward_chosen": 1.0, "reward_rejected": 0.0, "p_chosen": 0.5}
    lm_dir = preference.write_pairs(str(tmp_path / "lm"), "p0", {"train": [record], "test": [record]})
    flip(glob.glob(os.path.join(lm_dir, "*-test.array_record*"))[0])
    with pytest.raises(tfds_build.CorruptDataError, match=r"\(split 'test'\) is corrupt: Corrupted Riegeli"):
        preference.read_pairs(str(tmp_path / "lm"), "p0", preference.SyntheticLanguage(configs.task()))


@pytest.mark.parametrize("name,field", [("gmm_score", "num_samples"), ("gmm_fdistill", "num_samples"),
                                        ("gmm_diffusion_dpo", "num_samples"), ("synthetic_sft", "samples_per_prompt")])
def test_evaluation_sizes_below_the_minimum_are_refused_before_training(tmp_path, name, field):
    c = configs.load(name)
    c.eval[field] = 0
    wd = str(tmp_path / "run")
    with pytest.raises(configs.ConfigError, match=rf"config\.eval\.{field}=0 is below the minimum"):
        train.train_and_evaluate(c, wd)
    assert not os.path.exists(wd)


# ----- 7. teachers ---------------------------------------------------------------------------------------


def test_a_student_records_the_architecture_of_its_teacher(tmp_path, capsys):
    teacher, student = str(tmp_path / "teacher"), str(tmp_path / "student")
    c = tiny_distill_config()
    c.train.num_steps, c.eval.num_steps = 1, 2
    t = tiny_score_config(10)
    t.data = c.data  # the student's mixture
    t.eval.num_samples, t.eval.num_steps = 16, 1
    train.train_and_evaluate(t, teacher)
    c.distill.teacher = teacher
    c.model.width = 64  # replaced by the teacher's 32
    train.train_and_evaluate(c, student)
    with open(os.path.join(student, "config.json")) as f:
        assert json.load(f)["model"] == json.load(open(os.path.join(teacher, "config.json")))["model"]
    assert "model.width=64 -> 32" in capsys.readouterr().out
    train.train_and_evaluate(c, student)  # the same command resumes: the recorded architecture matches
    assert "already trained to step 1" in capsys.readouterr().out


# ----- tables --------------------------------------------------------------------------------------------


def test_a_table_stopped_by_sigterm_exits_143_without_starting_the_next_row_and_resumes(tmp_path):
    wd = str(tmp_path / "table")
    cmd = [sys.executable, "-m", "experiments.tables.fdistill_gmm", "--workdir", wd, "--divergences=rkl,kl",
           "--seeds=1", "--num_steps=200", "--config.model.width=32", "--config.model.depth=1",
           "--config.model.emb_dim=16", "--config.distill.fake_updates_per_gen=1", "--config.distill.disc_hidden=32",
           "--config.train.batch_size=64", "--config.eval.num_steps=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_rows(os.path.join(wd, "rkl", "seed_0"), 1, proc)
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert time.time() - t0 < 60
    assert "SIGTERM stopped row 'rkl seed 0'" in out and "Complete rows: none" in out, out[-3000:]
    assert "[fdistill_gmm] kl seed 0" not in out and not os.path.exists(os.path.join(wd, "kl"))

    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=3 * TIMEOUT_S)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with open(os.path.join(wd, "table.json")) as f:
        table = json.load(f)
    assert {d: len(runs) for d, runs in table["per_seed"].items()} == {"rkl": 1, "kl": 1}
    assert all(runs[0]["step"] == 200 for runs in table["per_seed"].values())
