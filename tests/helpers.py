"""Small configs shared by the tests."""
import os

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


def check_named_run_errors(build, field: str, make_with: str, run_config, tmp_path):
    """`build(workdir)` (an objective whose `config.<field>` is `workdir`) fails for an empty, a
    missing and an unfinished run, naming the field and the command that makes the run."""
    import json
    import re

    import pytest

    make = re.escape(f"python -m experiments.run --config ml_collections_configs/{make_with}.py --workdir")
    with pytest.raises(ValueError, match=rf"config.{field} is empty: .*{make} DIR"):
        build("")
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=rf"config.{field}='{missing}' is not a run's workdir "
                                                rf"\(no config.json\); make it with: {make} {missing}"):
        build(missing)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps(run_config.to_dict()))
    with pytest.raises(FileNotFoundError, match=rf"config.{field}='{unfinished}' is unfinished \(no results.json\); "
                                                rf"finish it by re-running: {make} {unfinished}"):
        build(str(unfinished))
