"""EDM's networks as configs and teachers: parameter counts of the paper configs, conversion of an
EDM state dict into a finished score run, and a 2-step f-distill from it on CIFAR-shaped data."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fdistill import configs, objectives, runs
from fdistill.models import edm_song
from experiments import convert_edm, count_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "edm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def edm_counts() -> dict:
    """{config name: EDM's parameter count} as recorded by the fixture scripts."""
    with open(os.path.join(FIXTURES, "param_counts.json")) as f:
        out = json.load(f)
    with open(os.path.join(FIXTURES, "adm_param_counts.json")) as f:
        out.update({k: v["params"] for k, v in json.load(f)["configs"].items()})
    return out


@pytest.mark.parametrize("config_name,overrides,key", [
    ("cifar10_edm_score", {}, "cifar10_ddpmpp_cond"),
    ("cifar10_edm_score", {"num_classes": 0}, "cifar10_ddpmpp_uncond"),
    ("cifar10_edm_score", {"name": "edm_ncsnpp"}, "cifar10_ncsnpp_cond"),
    ("cifar10_edm_score", {"name": "edm_ncsnpp", "num_classes": 0}, "cifar10_ncsnpp_uncond"),
    ("imagenet64_edm_score", {}, "imagenet64_cond"),
])
def test_paper_configs_have_edms_parameter_counts(config_name, overrides, key):
    """The configs build EDM's published networks, to the parameter (counts recorded from EDM's code)."""
    original = configs.load(config_name)
    config = original.copy_and_resolve_references()
    for k, v in overrides.items():
        config.model[k] = v
    config = count_params.with_model_defaults(config, original)
    counts = edm_counts()
    assert count_params.count(config, count_params.data_shape(config)) == counts[key]


def test_count_params_command_line():
    out = subprocess.run([sys.executable, "-m", "experiments.count_params", "--config",
                          "ml_collections_configs/cifar10_edm_score.py", "--config.model.num_classes=0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"parameters: {edm_counts()['cifar10_ddpmpp_uncond']}"


SMALL = dict(model_type="SongUNet", img_resolution=32, img_channels=3, label_dim=10, sigma_data=0.5,
             model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16], augment_dim=9,
             dropout=0.13, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
             decoder_type="standard", resample_filter=[1, 1])


class RandomCifar:
    """A stand-in for tfds:cifar10 (not on this machine): random 32x32x3 images and labels."""

    shape, num_classes = (32, 32, 3), 10

    def __init__(self, data_config):
        self.seed = int(data_config.seed)

    def batch(self, step, global_batch, process_index=0, process_count=1):
        rng = np.random.default_rng([self.seed, step])
        n = global_batch // process_count
        return {"x": rng.uniform(-1, 1, (n,) + self.shape).astype(np.float32),
                "label": rng.integers(0, 10, n).astype(np.int32)}

    def reference(self, n, seed=0):
        return np.random.default_rng([self.seed, seed]).uniform(-1, 1, (n,) + self.shape).astype(np.float32)

    def evaluate_samples(self, x, labels=None):
        return {"mean": float(np.mean(x))}

    def plot_samples(self, x, path, title=""):
        return path


def test_converted_edm_network_is_an_fdistill_teacher(tmp_path, monkeypatch):
    """EDM names -> a finished score run (config.json names edm_ddpmpp and the network's fields);
    cifar10_edm_fdistill.py takes it as its teacher, copies its architecture, compiles and steps."""
    module = edm_song.SongUNet(out_channels=3, num_classes=10, **{k: tuple(v) if isinstance(v, list) else v
                                                                   for k, v in SMALL.items()
                                                                   if k in edm_song.SongUNet.__dataclass_fields__})
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                          edm_song.abstract_params(module, (1, 32, 32, 3)))
    state_dict = {"model." + k: v for k, v in edm_song.to_state_dict(params, module, (32, 32, 3)).items()}
    teacher_dir = str(tmp_path / "edm_teacher")
    config = convert_edm.teacher_config(SMALL)
    assert config.model.name == "edm_ddpmpp" and config.model.model_channels == 16 and config.model.num_classes == 10
    convert_edm.write_teacher(teacher_dir, config, state_dict, "test-pickle.pkl")
    run = runs.open_run(teacher_dir, "distill.teacher", ("score",), "cifar10_edm_score")
    jax.tree.map(np.testing.assert_array_equal, runs.restore_params(run), params)
    with pytest.raises(FileExistsError, match="already holds a run"):
        convert_edm.write_teacher(teacher_dir, config, state_dict, "test-pickle.pkl")

    from fdistill.data import tfds_images

    monkeypatch.setattr(tfds_images, "make_source", RandomCifar)
    c = configs.load("cifar10_edm_fdistill")
    c.distill.teacher = teacher_dir
    c.data.feature_fn = ""  # no Inception weights here
    c.train.batch_size = 8
    c.distill.fake_updates_per_gen = 1
    obj = objectives.build(c)
    assert obj.config.model.model_channels == 16  # the teacher's architecture, adopted
    state, frozen = obj.init(jax.random.PRNGKey(0))
    step = jax.jit(obj.train_step)
    for i in range(2):
        state, metrics = step(state, frozen, obj.batch(i))
    assert int(state.step) == 2
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["loss_fake"]))


def test_reading_a_pickle_without_its_requirements_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nvlabs-fi-cdn"):
        convert_edm.read_pickle(str(tmp_path / "missing.pkl"))
    fake = tmp_path / "edm.pkl"
    fake.write_bytes(b"not a pickle")
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs PyTorch"):
            convert_edm.read_pickle(str(fake))
    else:
        with pytest.raises(ImportError, match="NVlabs/edm source on PYTHONPATH"):
            convert_edm.read_pickle(str(fake))
    with pytest.raises(ValueError, match="model_type='VPUNet' is not supported"):
        convert_edm.teacher_config({**SMALL, "model_type": "VPUNet"})


def test_missing_inception_weights_stop_the_run_at_start():
    c = configs.load("gmm_score")
    c.eval.inception_weights = "/nonexistent/pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="pytorch-fid"):
        objectives.build(c)
