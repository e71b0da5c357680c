"""Multi-process training on JAX's distributed runtime: 2 local CPU processes x 4 devices.

`python -m experiments.run` is launched twice (process 0 and 1, coordinator on 127.0.0.1) on a tiny
`gmm_score` config with its parameters sharded (`mesh.fsdp=4`: a (data 2, fsdp 4) mesh, each
process one data row), while the same config trains replicated in this pytest process on 8
devices. The loss trajectories must agree (each process loads only its half of every batch, and
`jax.make_array_from_process_local_data` assembles the global batch), only process 0 writes logs
and results (evaluated on the gathered state), and the sharded checkpoint written by both
processes restores and resumes in 1 process with fsdp 1.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from fdistill import checkpoint, train
from tests.helpers import REPO, config_flags, load_config, tiny_score_config

NUM_STEPS = 12
TIMEOUT_S = 150  # per subprocess; the whole test takes ~30-50 s on 2 shared cores


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_rows(workdir) if "loss" in r}


def launch_two_processes(config, workdir, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    address = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "experiments.run", "--config", os.path.join(REPO, "ml_collections_configs/gmm_score.py"),
           "--workdir", workdir, *config_flags(config, load_config("gmm_score"))]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs, logs = [], []
    for pid in range(2):
        log = open(tmp_path / f"process_{pid}.log", "w+")
        logs.append(log)
        if pid == 0:  # process 0 from flags, process 1 from FDISTILL_* environment variables
            args, penv = [f"--coordinator_address={address}", "--num_processes=2", "--process_id=0"], env
        else:
            args = []
            penv = dict(env, FDISTILL_COORDINATOR=address, FDISTILL_NUM_PROCESSES="2", FDISTILL_PROCESS_ID="1")
        procs.append(subprocess.Popen(cmd + args, cwd=REPO, env=penv, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def wait_all(procs, logs, deadline, expected_status: int = 0):
    """Waits for every process; on a timeout or an unexpected exit status kills the others (no hang)
    and fails with the logs."""
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline or any(p.returncode not in (None, expected_status) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != expected_status for p in procs):
        text = []
        for i, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- process {i} (rc={procs[i].returncode}) ---\n{log.read()[-4000:]}")
        pytest.fail("subprocess run failed or timed out:\n" + "\n".join(text))
    for log in logs:
        log.close()


def test_two_processes_match_one_process_and_checkpoint_restores(tmp_path):
    assert jax.device_count() == 8 and jax.process_count() == 1
    config = tiny_score_config(NUM_STEPS, checkpoint_every=6)
    sharded = config.copy_and_resolve_references()
    sharded.mesh.fsdp, sharded.mesh.min_shard_size = 4, 64  # the tiny network's kernels are split
    two, one = str(tmp_path / "two_processes"), str(tmp_path / "one_process")

    procs, logs = launch_two_processes(sharded, two, tmp_path)
    try:
        # The 1-process, 8-device reference trains here while the two processes run.
        train.train_and_evaluate(config, one)
    finally:
        wait_all(procs, logs, time.time() + TIMEOUT_S)

    # Same loss trajectory (float32 reductions in a different order: ~1e-7 apart).
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l2) == list(range(1, NUM_STEPS + 1)), "process 0 must log every step exactly once"
    np.testing.assert_allclose([l2[s] for s in sorted(l1)], [l1[s] for s in sorted(l1)], rtol=1e-5)

    # Only process 0 writes: one row per step (no duplicates), one final eval row, one results.json.
    rows = read_rows(two)
    assert len([r for r in rows if "loss" in r]) == NUM_STEPS
    assert len([r for r in rows if "eval/mmd" in r]) == 1
    with open(os.path.join(two, "results.json")) as f:
        results = json.load(f)
    assert results["step"] == NUM_STEPS and np.isfinite(results["mmd"])
    with open(os.path.join(one, "results.json")) as f:
        results_one = json.load(f)
    # Evaluation ran on a host-local copy of the same state in every process: same metrics.
    np.testing.assert_allclose(results["mmd"], results_one["mmd"], rtol=1e-3, atol=1e-6)
    with open(tmp_path / "process_1.log") as f:
        assert "[fdistill] results" not in f.read()  # process 1 prints no log lines
    with open(tmp_path / "process_0.log") as f:
        placed = re.search(r"mesh data=2 x fsdp=4; [^;]*; state [^;]*\((\d+) of \d+ leaves sharded\)", f.read())
    assert placed and int(placed.group(1)) > 0, "the 2-process run must shard its parameters"

    # Both processes took part in the checkpoint saves; the checkpoints restore in 1 process.
    assert sorted(int(s) for s in os.listdir(os.path.join(two, "checkpoints")) if s.isdigit()) == [6, 12]
    tree_two, tree_one = checkpoint.restore_tree(two), checkpoint.restore_tree(one)
    assert int(tree_two["step"]) == NUM_STEPS
    chex.assert_trees_all_close(tree_two["params"], tree_one["params"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(tree_two["opt_state"], tree_one["opt_state"], rtol=1e-4, atol=1e-6)

    # Resuming the 2-process fsdp-4 run in 1 process with 8 devices and fsdp 1 continues the same
    # trajectory.
    more = tiny_score_config(NUM_STEPS + 2, checkpoint_every=6)
    train.train_and_evaluate(more, two)
    train.train_and_evaluate(more, one)
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l2) == list(range(1, NUM_STEPS + 3))
    np.testing.assert_allclose([l2[s] for s in (13, 14)], [l1[s] for s in (13, 14)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    """Preemption notices reach processes at different steps; without agreement the signalled
    process stops while the other blocks forever in the next step's collectives."""
    config = tiny_score_config(100_000, log_every=20, checkpoint_every=100_000)
    wd = str(tmp_path / "run")
    procs, logs = launch_two_processes(config, wd, tmp_path)
    try:
        deadline = time.time() + TIMEOUT_S
        metrics = os.path.join(wd, "metrics.jsonl")
        while not (os.path.exists(metrics) and os.path.getsize(metrics)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "run did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        wait_all(procs, logs, time.time() + 60, expected_status=143)  # both stopped early: 128 + SIGTERM
    saved = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert len(saved) == 1 and saved[0] % 20 == 0, saved
    assert read_rows(wd)[-1]["step"] == saved[0]
    assert not os.path.exists(os.path.join(wd, "results.json"))


@pytest.mark.slow
def test_long_dispatch_queue_on_two_cpu_devices_does_not_deadlock(tmp_path):
    """With 2 or 4 CPU devices in a process, ~50 queued steps of a collective program deadlocked
    XLA's CPU runtime (all-reduce rendezvous timeout, abort) when metrics were pulled only every
    500 steps; the loop now keeps at most `train.MAX_STEPS_IN_FLIGHT` steps in flight."""
    config = tiny_score_config(300, log_every=300, checkpoint_every=300)
    config.model.width, config.model.depth, config.model.emb_dim = 128, 3, 64  # gmm_score's network
    config.train.batch_size = 512
    cmd = [sys.executable, "-m", "experiments.run", "--config", os.path.join(REPO, "ml_collections_configs/gmm_score.py"),
           "--workdir", str(tmp_path / "run"), *config_flags(config, load_config("gmm_score"))]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_all([proc], [log], time.time() + TIMEOUT_S)
    assert train_losses(str(tmp_path / "run")).keys() == {300}
