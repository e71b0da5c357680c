"""Test set-up: 8 simulated CPU devices and a persistent compilation cache, before JAX starts."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("FDISTILL_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fdistill_jax")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running experiment checks (deselect with -m 'not slow')")
