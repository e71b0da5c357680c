"""Checks shared by the tests of objectives that name other runs by their workdir (`fdistill.runs`)."""
import json
import re

import pytest


def check_named_run_errors(build, field: str, make_with: str, run_config, tmp_path):
    """`build(workdir)` (an objective whose `config.<field>` is `workdir`) fails for an empty, a
    missing and an unfinished run, naming the field and the command that makes the run."""
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
