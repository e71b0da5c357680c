"""Converts a published EDM network pickle into a finished 'score' run that `distill.teacher` accepts.

    PYTHONPATH=/path/to/NVlabs/edm python -m experiments.convert_edm \
        --pkl edm-cifar10-32x32-cond-vp.pkl --out runs/edm_cifar10_cond
    python -m experiments.run --config ml_collections_configs/cifar10_edm_fdistill.py \
        --workdir runs/fdistill_cifar10 --config.distill.teacher=runs/edm_cifar10_cond

Reading the pickle needs PyTorch and the NVlabs/edm source on PYTHONPATH (EDM pickles its classes
by reference, `torch_utils.persistence`, as EDM's own `generate.py` does). The pickle's 'ema'
network (`EDMPrecond` around a `SongUNet` or `DhariwalUNet`) gives its constructor arguments and
its state dict; the state dict is mapped onto the Flax networks of `fdistill.models.edm_song` /
`edm_adm` (their `convert_state_dict`), and written as the workdir of a finished score run:

  config.json   the score config `--config` (default: cifar10_edm_score.py for 32x32 networks,
                imagenet64_edm_score.py for 64x64) with config.model from the pickle (edm_ddpmpp,
                edm_ncsnpp or edm_adm and their fields), config.diffusion's sigma_data/min/max
  checkpoints/0 {'params': the network}        results.json  {'step': 0, 'converted_from': ...}

Only the VE/EDM preconditioning (`EDMPrecond`) is supported (EDM's VP/VE/iDDPM baselines are
other parametrisations). `write_teacher` (state dict in NumPy -> workdir) needs no PyTorch; the
tests use it on fixture weights.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags


CONFIG_BY_RESOLUTION = {32: "cifar10_edm_score", 64: "imagenet64_edm_score"}
SONG_FIELDS = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout",
               "label_dropout", "augment_dim", "embedding_type", "channel_mult_noise", "encoder_type",
               "decoder_type", "resample_filter")
ADM_FIELDS = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout",
              "label_dropout", "augment_dim")


def read_pickle(path: str) -> tuple[dict, dict]:
    """(constructor kwargs of the pickle's EDMPrecond, its inner network's state dict as float32
    NumPy arrays). Needs PyTorch and the NVlabs/edm source importable."""
    import pickle

    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pkl={path!r} does not exist (EDM's pickles: "
                                "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/)")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError("reading an EDM pickle needs PyTorch: pip install torch (the CPU build suffices)") from None
    try:
        import dnnlib  # noqa: F401
        import torch_utils  # noqa: F401
    except ImportError:
        raise ImportError("reading an EDM pickle needs the NVlabs/edm source on PYTHONPATH (its dnnlib and "
                          "torch_utils packages unpickle the network): git clone https://github.com/NVlabs/edm and "
                          "PYTHONPATH=/path/to/edm python -m experiments.convert_edm ...") from None
    with open(path, "rb") as f:
        data = pickle.load(f)
    net = data["ema"] if isinstance(data, dict) and "ema" in data else data
    if type(net).__name__ != "EDMPrecond":
        raise ValueError(f"{path}: holds a {type(net).__name__}; only EDMPrecond networks (EDM's own models) convert")
    kwargs = dict(getattr(net, "init_kwargs", {}))
    state = {k: v.detach().float().cpu().numpy().astype(np.float32) for k, v in net.model.state_dict().items()}
    return kwargs, state


def model_section(kwargs: dict):
    """config.model for EDMPrecond kwargs: the network's name and fields (missing ones keep the
    defaults of EDM's constructors, which are this project's defaults for that network)."""
    from fdistill import configs

    model_type = kwargs.get("model_type", "DhariwalUNet")
    if model_type == "SongUNet":
        name = "edm_ncsnpp" if kwargs.get("embedding_type") == "fourier" else "edm_ddpmpp"
        fields = SONG_FIELDS
    elif model_type == "DhariwalUNet":
        name, fields = "edm_adm", ADM_FIELDS
    else:
        raise ValueError(f"model_type={model_type!r} is not supported; allowed: ['SongUNet', 'DhariwalUNet']")
    # EDM's constructor defaults, for kwargs the pickle does not carry
    edm_song_defaults = dict(model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                             attn_resolutions=(16,), dropout=0.10, label_dropout=0.0, augment_dim=0,
                             embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                             decoder_type="standard", resample_filter=(1, 1))
    edm_adm_defaults = dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                            attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0, augment_dim=0)
    defaults = edm_song_defaults if model_type == "SongUNet" else edm_adm_defaults
    section = configs.model(name)
    for f in fields:
        v = kwargs.get(f, defaults[f])
        section[f] = tuple(v) if isinstance(v, (list, tuple)) else type(section[f])(v)
    section.num_classes = int(kwargs.get("label_dim", 0) or 0)
    return section


def teacher_config(kwargs: dict, config_name: str = ""):
    """The completed score config of the converted network (see the module docstring)."""
    from fdistill import configs, data

    resolution = int(kwargs.get("img_resolution", 0))
    name = config_name or CONFIG_BY_RESOLUTION.get(resolution)
    if not name:
        raise ValueError(f"no score config for {resolution}x{resolution} networks; pass --config")
    config = configs.load(name)
    shape = (resolution, resolution, int(kwargs.get("img_channels", 3)))
    if data.known_shape(config.data) != shape:
        raise ValueError(f"the network takes {shape} images; config {name!r} has data {config.data.name} "
                         f"{data.known_shape(config.data)}")
    config.model = model_section(kwargs)
    config.data.label_key = "label" if config.model.num_classes else ""
    for f in ("sigma_data", "sigma_min", "sigma_max"):
        if f in kwargs:
            config.diffusion[f] = float(kwargs[f])
    return configs.complete(config.to_dict())


def write_teacher(workdir: str, config, state_dict: dict, source: str) -> None:
    """Writes the finished score run of `config` holding `state_dict` (EDM names, NumPy) in `workdir`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fdistill import checkpoint, data, models
    from fdistill import workdir as workdir_lib

    wd = workdir_lib.Workdir(workdir)
    if wd.has_run_files() or os.path.exists(wd.config_path):
        raise FileExistsError(f"--out={workdir!r} already holds a run; choose a new directory")
    shape = data.known_shape(config.data)
    net = models.build(config.model, shape)
    module = __import__(models.MODELS[config.model.name][0], fromlist=["convert_state_dict"])
    params = module.convert_state_dict(state_dict, net, shape)
    kw = {"labels": jnp.zeros((1,), jnp.int32)} if config.model.num_classes else {}
    expected = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1,) + shape), jnp.zeros((1,)), **kw)["params"],
                              jax.random.PRNGKey(0))
    got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got))):
        raise ValueError(f"{source}: the converted parameters do not match the network of config.model "
                         f"({config.model.name})")
    n = models.network_param_count(config.model.name, params)
    with wd.locked():
        ckpt = checkpoint.Checkpointer(wd.checkpoints, keep=1, save_every=1)
        ckpt.save(0, {"params": jax.tree.map(lambda x: np.asarray(x, np.float32), params)})
        ckpt.wait()
        workdir_lib.write_json(wd.config_path, config.to_dict())
        workdir_lib.write_json(wd.results_path, {"step": 0, "converted_from": os.path.abspath(source),
                                                 "num_params": n})
    print(f"[fdistill] wrote {workdir}: {config.model.name}, {n / 1e6:.1f}M parameters, "
          f"data {config.data.name} {shape}, {config.model.num_classes} classes", flush=True)


def define_flags() -> None:
    """The command line's flags (defined only when run as a program: the functions above are imported by tests)."""
    global _CONFIG, _OUT, _PKL
    _PKL = flags.DEFINE_string("pkl", None, "An EDM network pickle (e.g. edm-cifar10-32x32-cond-vp.pkl).")
    _OUT = flags.DEFINE_string("out", None, "The workdir to write (must not hold a run).")
    _CONFIG = flags.DEFINE_string("config", "", "The score config whose data/diffusion sections the run takes "
                                  "(default: by resolution, cifar10_edm_score.py or imagenet64_edm_score.py).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _PKL.value or not _OUT.value:
        raise app.UsageError("--pkl and --out are required")
    try:
        kwargs, state = read_pickle(_PKL.value)
        write_teacher(_OUT.value, teacher_config(kwargs, _CONFIG.value), state, _PKL.value)
    except (ImportError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
