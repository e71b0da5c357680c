"""Configs as data (fdistill/configs.py): every experiment file completes against its base, unknown
fields and wrong types fail naming the field, and the CLI rejects a typo'd override at start."""
import os
import subprocess
import sys

import pytest

from fdistill import configs
from tests.helpers import REPO

EXPERIMENTS = sorted(f[:-3] for f in os.listdir(configs.CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_is_its_base_plus_differences(name):
    """Each file loads, completes against its base unchanged, and imports no importlib."""
    c = configs.load(name)
    assert configs.complete(c).to_dict() == c.to_dict()
    with open(os.path.join(configs.CONFIG_DIR, f"{name}.py")) as f:
        assert "importlib" not in f.read()


def test_complete_fills_defaults_and_rejects_unknown_fields_and_types():
    c = configs.complete({"objective": "score", "train": {"num_steps": 7}})
    assert c.train.num_steps == 7 and c.train.batch_size == configs.train().batch_size
    assert c.data.name == "gmm" and c.model.name == "mlp"
    with pytest.raises(configs.ConfigError, match=r"config\.train\.num_stepz is not a config field; "
                                                  r"did you mean config\.train\.num_steps"):
        configs.complete({"objective": "score", "train": {"num_stepz": 7}})
    with pytest.raises(configs.ConfigError, match=r"config\.train\.num_steps expects an integer, got 'x'"):
        configs.complete({"objective": "score", "train": {"num_steps": "x"}})
    with pytest.raises(configs.ConfigError, match="config.objective='scor' is not a known objective"):
        configs.complete({"objective": "scor"})
    # the data section follows its source: a digits field is unknown on the mixture
    with pytest.raises(configs.ConfigError, match=r"config\.data\.resolution is not a config field"):
        configs.complete({"objective": "score", "data": {"name": "gmm", "resolution": 8}})
    assert configs.complete({"objective": "score", "data": {"name": "tfds:cifar10"}}).data.split == "train"


def test_override_sets_known_fields_and_rejects_a_typo():
    """configs.override (the table runs' and the configs' {'section.field': value} sets)."""
    c = configs.override(configs.load("gmm_fdistill"), {"distill.lambda_gan": 0.5, "train.num_steps": 3})
    assert c.distill.lambda_gan == 0.5 and c.train.num_steps == 3
    with pytest.raises(configs.ConfigError, match=r"distill\.lambda_gn is not a config field; did you mean "
                                                  r"distill\.lambda_gan"):
        configs.override(c, {"distill.lambda_gn": 0.5})
    with pytest.raises(configs.ConfigError, match=r"distil\.lambda_gan is not a config field"):
        configs.override(c, {"distil.lambda_gan": 0.5})
    assert "lambda_gn" not in c.distill


def test_check_overrides_names_field_and_type():
    c = configs.load("gmm_fdistill")
    configs.check_overrides(c, ["--config.distill.divergence=kl", "--config.distill.lr_gen=3e-4", "--workdir=x"])
    with pytest.raises(configs.ConfigError, match=r"config\.distill\.divergenc is not .*config\.distill\.divergence"):
        configs.check_overrides(c, ["--config.distill.divergenc=kl"])
    with pytest.raises(configs.ConfigError, match=r"config\.train\.batch_size expects an integer"):
        configs.check_overrides(c, ["--config.train.batch_size=big"])
    with pytest.raises(configs.ConfigError, match=r"config\.distill\.teacher_error_norm expects a boolean"):
        configs.check_overrides(c, ["--config.distill.teacher_error_norm=maybe"])


def test_cli_rejects_a_typo_before_anything_runs(tmp_path):
    wd = tmp_path / "w"
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--config", "ml_collections_configs/gmm_score.py",
                          "--workdir", str(wd), "--config.train.num_stepz=5"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "train.num_stepz" in out.stderr and "train.num_steps" in out.stderr
    assert "Traceback" not in out.stderr and not wd.exists()


def test_every_invalid_config_value_raises_config_error():
    """A `raise ValueError("config.<field> ...")` in the package would reach the CLI as a traceback;
    an invalid field value is a ConfigError (a one-line message, exit status 2)."""
    import pathlib
    import re

    offenders = []
    for path in sorted(pathlib.Path(REPO, "fdistill").rglob("*.py")):
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines):
            if "raise ValueError(" in line:
                message = line.split("raise ValueError(", 1)[1].strip() or lines[i + 1].strip()
                if re.match(r'f?"config\.', message):
                    offenders.append(f"{path.relative_to(REPO)}:{i + 1}")
    assert not offenders, offenders


def test_an_invalid_value_found_while_building_the_objective_is_a_config_error(tmp_path):
    """The main job without categories but with its continuous scale of 0.1: refused as a ConfigError
    naming the flags to pass, before any checkpoint exists."""
    from fdistill import train

    config = configs.override(configs.load("gmm_fdistill"), {"distill.latent_categories": 0})
    with pytest.raises(configs.ConfigError, match=r"latent_continuous_scale=0\.1 .*--config\.distill\.latent_dim=0"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(tmp_path / "w" / "checkpoints")


def test_every_digits_curve_run_is_a_valid_config():
    """Each run of the hour-long digits curve study (`experiments/studies/digits_curve.py`) applies to
    `digits_fdistill.py` (a misspelt field fails here, not when the run starts), `describe` strips
    only a trailing `_seed<N>`, and the goal is judged on fd_digits_inf only when the teacher and
    every run have it. In a subprocess: the study defines absl flags on import."""
    script = (
        "from experiments.studies import digits_curve as d\n"
        "from fdistill import configs\n"
        "d.flags.FLAGS(['digits_curve', '--workdir', 'unused'])\n"
        "for name, (_, overrides, steps) in d.RUNS.items():\n"
        "    c = configs.complete(d.run_of(name))\n"
        "    assert c.train.num_steps == steps and all(c[k.split('.')[0]][k.split('.')[1]] == v\n"
        "                                              for k, v in overrides.items()), name\n"
        "    assert d.describe(name + '_seed3') == d.describe(name) == d.RUNS[name][0]\n"
        "    assert c.eval.num_samples == 16384 and c.train.seed == 0 and d.run_of(name, 3).train.seed == 3\n"
        "new = {'a': [{'fd_digits': 5.0}, {'fd_digits': 4.0, 'fd_digits_inf': 3.0}]}\n"
        "both = {'teacher/fd_digits': 2.0, 'teacher/fd_digits_inf': 1.0}\n"
        "assert d.judged_metric(new, both) == 'fd_digits_inf'\n"
        "assert d.judged_metric({**new, 'b': [{'fd_digits': 5.0}]}, both) == 'fd_digits'\n"
        "assert d.judged_metric(new, {'teacher/fd_digits': 2.0}) == 'fd_digits'\n"
        "print(len(d.RUNS))\n")
    out = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 10


@pytest.mark.parametrize("seeds", ["1,a", "0,0", "0,00", "-1", ""])
def test_digits_curve_refuses_a_malformed_seed_list(tmp_path, seeds):
    """`--seed` takes distinct non-negative integers separated by commas; anything else stops before
    any run starts, naming the flag."""
    out = subprocess.run([sys.executable, "-m", "experiments.studies.digits_curve", "--workdir", str(tmp_path / "w"),
                          f"--seed={seeds}"], check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "--seed=" in out.stderr and "e.g. --seed 0,1" in out.stderr, out.stderr
    assert not (tmp_path / "w").exists()
