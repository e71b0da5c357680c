"""The training loop: workdir contents, resume, faults (NaN, corrupt checkpoint, SIGTERM)."""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import checkpoint, configs, objectives, sharding, train
from tests.helpers import REPO, tiny_score_config


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_rows(workdir) if "loss" in r}


def test_run_writes_the_workdir_and_resumes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    res = train.train_and_evaluate(tiny_score_config(20), a)
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoints", "tb", "plots"):
        assert os.path.exists(os.path.join(a, name)), name
    assert os.listdir(os.path.join(a, "plots"))
    with open(os.path.join(a, "results.json")) as f:
        saved = json.load(f)
    assert saved["step"] == 20 and res["step"] == 20
    for k in ("mode_coverage", "mode_weight_tv", "high_quality_frac", "mmd", "nfe", "samples_per_sec",
              "denoiser_rel_mse/sigma_0.02", "denoiser_rel_mse/sigma_20"):
        assert k in saved, k
    assert all("step" in r for r in read_rows(a))

    # 10 steps, stop, raise num_steps to 20: identical to 20 straight steps.
    train.train_and_evaluate(tiny_score_config(10), b)
    train.train_and_evaluate(tiny_score_config(20), b)
    la, lb = train_losses(a), train_losses(b)
    assert sorted(lb) == list(range(1, 21))
    np.testing.assert_allclose([la[s] for s in range(1, 21)], [lb[s] for s in range(1, 21)], rtol=1e-6)
    chex.assert_trees_all_close(checkpoint.restore_tree(a)["params"], checkpoint.restore_tree(b)["params"],
                                rtol=1e-6)
    # Re-running a finished run does not train again.
    assert train.train_and_evaluate(tiny_score_config(20), b)["step"] == 20


def test_one_and_eight_device_runs_agree(tmp_path):
    train.train_and_evaluate(tiny_score_config(12), str(tmp_path / "one"), num_devices=1)
    train.train_and_evaluate(tiny_score_config(12), str(tmp_path / "eight"), num_devices=8)
    l1, l8 = train_losses(str(tmp_path / "one")), train_losses(str(tmp_path / "eight"))
    np.testing.assert_allclose([l1[s] for s in sorted(l1)], [l8[s] for s in sorted(l8)], rtol=1e-5)


def test_batch_not_divisible_by_devices(tmp_path):
    with pytest.raises(ValueError, match="config.train.batch_size=60 is not divisible by the number of devices"):
        train.train_and_evaluate(tiny_score_config(2, batch_size=60), str(tmp_path))


def test_nan_stops_with_step_and_metric_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    wd = str(tmp_path)
    train.train_and_evaluate(tiny_score_config(10), wd)
    from fdistill.objectives.score import ScoreObjective

    good_step = ScoreObjective.train_step

    def nan_after_step_11(self, state, frozen, batch):  # a loss that turns NaN at step 12
        new_state, metrics = good_step(self, state, frozen, batch)
        metrics["loss"] = jnp.where(state.step >= 11, jnp.nan, metrics["loss"])
        return new_state, metrics

    monkeypatch.setattr(ScoreObjective, "train_step", nan_after_step_11)
    with pytest.raises(train.NonFiniteError, match=r"'loss' is nan at step 12"):
        train.train_and_evaluate(tiny_score_config(20), wd)
    monkeypatch.undo()
    tree = checkpoint.restore_tree(wd)
    assert int(tree["step"]) == 10
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree["params"]))
    # The run continues from the good checkpoint once the config is fixed.
    assert train.train_and_evaluate(tiny_score_config(20), wd)["step"] == 20


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
    wd = str(tmp_path)
    train.train_and_evaluate(tiny_score_config(20), wd)
    latest = os.path.join(wd, "checkpoints", "20")
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    os.remove(os.path.join(wd, "results.json"))
    obj = objectives.build(tiny_score_config(20))
    mesh = sharding.make_mesh()
    state, _ = obj.init(jax.random.PRNGKey(0))
    state = sharding.replicate(state, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"))
    _, step = ckpt.restore_latest(checkpoint.abstract_like(state, sharding.replicated(mesh)))
    ckpt.close()
    assert step == 10
    assert "falling back to the previous checkpoint" in capsys.readouterr().out
    assert not os.path.exists(latest) and os.path.isdir(latest + ".corrupt")  # set aside: step 20 is saved again
    assert train.train_and_evaluate(tiny_score_config(20), wd)["step"] == 20


def test_a_checkpoint_is_due_after_checkpoint_every_secs_of_wall_time(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=1000, save_every_secs=600)
    assert not ckpt.time_due()  # the clock starts at the first check (after the step is compiled)
    ckpt._last_save = time.monotonic() - 599
    assert not ckpt.time_due()
    ckpt._last_save = time.monotonic() - 601
    assert ckpt.time_due()
    ckpt.save(1, {"w": jnp.zeros(3)})
    assert not ckpt.time_due()  # a save restarts the clock
    ckpt.wait()
    ckpt.close()
    never = checkpoint.Checkpointer(str(tmp_path / "never"), save_every_secs=0)
    never._last_save = time.monotonic() - 10**6
    assert not never.time_due()  # 0 = no time-based saves
    never.close()


def test_time_based_checkpoints_are_saved_between_step_based_ones(tmp_path):
    # A due time on every step (1 ns) saves every step; keep=2 leaves the last two. Without it, only
    # the final step: checkpoint_every is out of reach.
    timed, untimed = str(tmp_path / "timed"), str(tmp_path / "untimed")
    train.train_and_evaluate(tiny_score_config(12, checkpoint_every=10**6, checkpoint_every_secs=1e-9), timed)
    train.train_and_evaluate(tiny_score_config(12, checkpoint_every=10**6, checkpoint_every_secs=0), untimed)
    assert sorted(os.listdir(os.path.join(timed, "checkpoints"))) == ["11", "12"]
    assert sorted(os.listdir(os.path.join(untimed, "checkpoints"))) == ["12"]
    with pytest.raises(configs.ConfigError, match="config.train.checkpoint_every_secs must be >= 0"):
        train.train_and_evaluate(tiny_score_config(12, checkpoint_every_secs=-1), str(tmp_path / "bad"))


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    wd = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "experiments.run", "--config", "ml_collections_configs/gmm_score.py",
           "--workdir", wd, "--config.train.num_steps=1000000", "--config.train.log_every=10",
           "--config.train.checkpoint_every=100000", "--config.model.width=32", "--config.eval.num_samples=256",
           "--config.eval.chunk=256", "--config.eval.num_steps=4", "--config.train.eval_every=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out.decode()[-3000:]  # 128 + SIGTERM: stopped early, resumable
    assert "stopped by SIGTERM: saved step" in out.decode(), out.decode()[-3000:]
    saved = checkpoint.restore_tree(wd)
    stopped_at = int(saved["step"])
    assert stopped_at >= 30
    # The same command (with a reachable num_steps) resumes from the saved step.
    cmd[cmd.index("--config.train.num_steps=1000000")] = f"--config.train.num_steps={stopped_at + 10}"
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"resumed from {wd}/checkpoints at step {stopped_at}" in out.stdout + out.stderr
    with open(os.path.join(wd, "results.json")) as f:
        assert json.load(f)["step"] == stopped_at + 10
