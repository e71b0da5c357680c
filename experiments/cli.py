"""What every command line of `experiments` shares (no flags are defined here)."""
from __future__ import annotations

import sys


def check_config_overrides(argv: list[str]) -> None:
    """Rejects an unknown `--config.a.b` field (naming the closest valid ones) or a value of the
    wrong type before anything runs; exits with status 2 and one line of explanation."""
    from fdistill import configs

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None:
        return  # absl reports the missing flag
    try:
        configs.check_overrides(configs.load(path.split(":", 1)[0]), argv)
    except (configs.ConfigError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
