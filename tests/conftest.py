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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def score_run_dir(tmp_path_factory):
    """A tiny finished GMM score run (`tests.helpers.tiny_reference_config`), trained once per session:
    the reference of the diffusion-preference tests, FIND's sampler and DDPO's initial policy."""
    from fdistill import train
    from tests.helpers import tiny_reference_config

    wd = str(tmp_path_factory.mktemp("score_run"))
    train.train_and_evaluate(tiny_reference_config(), wd)
    return wd
