"""Small configs shared by the tests, the command line and environment of subprocess runs, and a
run's logged metrics."""
import json
import os
import sys

from fdistill import configs
from fdistill.configs import load as load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_score_config(num_steps: int = 20, **train):
    """gmm_score with a small network, batch and evaluation: seconds, not minutes."""
    c = load_config("gmm_score")
    c.model.width = 32
    c.model.depth = 1
    c.model.emb_dim = 16
    c.train.num_steps = num_steps
    c.train.batch_size = 64
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 10
    c.eval.num_samples = 256
    c.eval.chunk = 256
    c.eval.num_steps = 4
    for k, v in train.items():
        c.train[k] = v
    return c


def tiny_reference_config(num_steps: int = 300):
    """A tiny score run good enough to be a reference or a frozen sampler (the `score_run_dir` fixture)."""
    c = tiny_score_config(num_steps, learning_rate=3e-3, checkpoint_every=num_steps, log_every=100)
    c.model.width, c.model.depth = 64, 2
    return c


def tiny_distill_config(name: str = "gmm_fdistill", **distill):
    """A distillation config with a small network and batch (a step in milliseconds); `distill`
    overrides fields of `config.distill`. The generator's z has the data's shape (no wider latent, no
    categories: `configs.DATA_SHAPED_LATENT`), and gmm_fdistill.py's categorical student falls back to
    its continuous predecessor's fixed noise range (`configs.STUDENT_CONTINUOUS`), so that tests can
    write G(z) = D(80 z) out and start from network teachers; the wide-latent and categorical
    generators have their own tests."""
    c = load_config(name)
    c.model.width, c.model.depth, c.model.emb_dim = 32, 1, 16
    if c.distill.latent_categories:
        configs.override(c, configs.STUDENT_CONTINUOUS)
    configs.override(c, configs.DATA_SHAPED_LATENT)
    c.distill.fake_updates_per_gen = 2
    c.distill.disc_hidden = 32
    for k, v in distill.items():
        c.distill[k] = v
    c.train.batch_size = 64
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
    c.eval.num_samples = 4096
    return c


def config_flags(config, base) -> list[str]:
    """`--config.a.b=v` flags turning `base` into `config` (scalar fields only)."""
    flags = []

    def walk(c, b, prefix):
        for k, v in c.items():
            if hasattr(v, "items"):
                walk(v, b[k], f"{prefix}{k}.")
            elif b.get(k) != v:
                flags.append(f"--config.{prefix}{k}={v}")

    walk(config, base, "")
    return flags


def cli_env(num_devices: int = 1) -> dict:
    """The environment of a subprocess run: CPU, `num_devices` devices, this checkout's code first on
    the path, and the tests' persistent compilation cache."""
    cache = os.environ.get("FDISTILL_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fdistill_jax"))
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def score_cli(workdir: str, config) -> list[str]:
    """`python -m experiments.run` training `config` (a gmm_score config) in `workdir`."""
    path = os.path.join(REPO, "ml_collections_configs/gmm_score.py")
    return [sys.executable, "-m", "experiments.run", "--config", path, "--workdir", workdir,
            *config_flags(config, load_config("gmm_score"))]


def logged_rows(workdir, metric: str | None = None) -> list[dict]:
    """The rows of `workdir`'s metrics.jsonl (those that hold `metric`, when given)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if metric is None or metric in row]
