"""EDM teacher (denoising score matching, arXiv 2206.00364) on 8x8 handwritten digits with a U-Net.

    python -m experiments.run --config ml_collections_configs/digits_score.py --workdir runs/digits_score

About 20 minutes on 2 CPU cores. The digits TFDS dataset is built into ~/.cache/fdistill/tfds on
first use (`--config.data.data_dir=DIR` to change; nothing is downloaded) and the digits classifier
used by the metrics is trained once (~20 s) and cached there. Writes sample grids to plots/ at every
evaluation and results.json with 35-NFE Heun metrics of the EMA network: fd_digits, precision,
recall, class_entropy (log 10 = 2.303 when all classes are equally frequent), samples_per_sec.

Options: `--config.data.resolution=16` (bilinear 2x upsampling; ~4x slower per step),
`--config.model.num_classes=10` (class-conditional), `--config.model.channels=64` and
`--config.model.channel_mult='(1, 2, 2)'` for wider/deeper nets; CIFAR-10 or ImageNet-64 prepared
locally: `--config.data.name=tfds:cifar10 --config.data.data_dir=DIR` with a larger model.
"""
from fdistill import configs


def get_config():
    c = configs.base("score", data="digits", model="unet")  # U-Net widths 32, 64 at resolutions 8, 4
    c.train.num_steps = 8000
    c.train.batch_size = 64
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.999
    c.train.log_every = 200
    c.train.eval_every = 4000  # also writes a sample grid to plots/
    c.eval.num_samples = 2048
    c.eval.num_steps = 18  # Heun: NFE = 35
    c.eval.chunk = 512
    return c
