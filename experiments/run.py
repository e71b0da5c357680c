"""The experiment CLI: train and evaluate one config in one workdir.

    python -m experiments.run --config ml_collections_configs/gmm_score.py --workdir runs/gmm_score \
        [--config.train.num_steps=500]

Re-running the same command resumes from the latest checkpoint in the workdir; a changed config
that would change what is trained is refused (exit status 2) unless --force_new starts the workdir
over. Exit status: 0 when finished, 143 / 130 when SIGTERM / Ctrl-C stopped it after saving a
checkpoint (re-run to resume), 1 when the workdir is in use by another run, the disk is full or a
dataset file is corrupt, 2 for an invalid or changed config. Multi-process runs pass
--coordinator_address/--num_processes/--process_id (or FDISTILL_* environment variables; on TPU
pods and SLURM set FDISTILL_AUTO_DISTRIBUTED=1).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import check_config_overrides

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and results.")
_FORCE_NEW = flags.DEFINE_bool("force_new", False, "Delete everything in --workdir and train from scratch (needed to "
                               "reuse a workdir with a config that changes what is trained).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "fdistill_jax"),
    "Persistent JAX compilation cache directory ('' disables it).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    import jax

    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from fdistill import configs, sharding, train, workdir
    from fdistill.data.tfds_build import CorruptDataError

    if _COORDINATOR.value:
        sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, force_new=_FORCE_NEW.value)
    except (workdir.WorkdirError, configs.ConfigError, CorruptDataError) as e:  # the message says it all
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2 if isinstance(e, configs.ConfigError) else getattr(e, "exit_code", 1))


if __name__ == "__main__":
    check_config_overrides(sys.argv)
    app.run(main)
