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
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "score"

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits | tfds:<name>
    c.data.resolution = 8  # 8 | 16 (digits only)
    c.data.data_dir = ""  # '' = $FDISTILL_DATA_DIR or ~/.cache/fdistill/tfds
    c.data.seed = 0  # epoch shuffling: permutation of epoch e from default_rng([seed, e])

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.channels = 32
    c.model.channel_mult = (1, 2)  # widths 32, 64 at resolutions 8, 4
    c.model.num_res_blocks = 2
    c.model.attention = True  # self-attention at the lowest resolution
    c.model.num_heads = 1
    c.model.emb_dim = 128
    c.model.num_classes = 0  # 10 = class-conditional
    c.model.dropout = 0.0

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.sigma_data = 0.5
    c.diffusion.p_mean = -1.2
    c.diffusion.p_std = 1.2
    c.diffusion.sigma_min = 0.002
    c.diffusion.sigma_max = 80.0
    c.diffusion.rho = 7.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 8000
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.grad_clip = 1.0
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.999
    c.train.seed = 0
    c.train.log_every = 200
    c.train.eval_every = 4000  # also writes a sample grid to plots/
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.compute_dtype = "float32"
    c.train.grad_accum_steps = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 2048
    c.eval.num_steps = 18  # Heun: NFE = 35
    c.eval.sampler = "heun"
    c.eval.chunk = 512
    return c
