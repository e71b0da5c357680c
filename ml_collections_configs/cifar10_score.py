"""EDM teacher at CIFAR-10 size (a DDPM++-scale U-Net, arXiv 2206.00364 Table 7), sharded with FSDP.

    python -m experiments.run --config ml_collections_configs/cifar10_score.py --workdir runs/cifar10_score \
        --config.data.data_dir=DIR --config.mesh.fsdp=8

Not trained by this project (a paper-size config: `benchmarks/fsdp_memory.py` compiles and steps it
and measures its per-device memory at fsdp = 1, 2, 4, 8). Needs CIFAR-10 prepared as a local TFDS
dataset in DIR (`tfds build cifar10 --data_dir DIR` on a machine with network access; nothing is
downloaded here). The U-Net: 128 channels x (2, 2, 2) at 32, 16, 8 pixels, 4 residual blocks per
level, self-attention in the 8x8 middle block (DDPM++ also attends at 16x16; this U-Net attends only
in the middle): 82.8M parameters (printed at start with the per-device share; EDM's DDPM++ has
56M, its residual blocks and embedding are leaner). `mesh.fsdp`
splits parameters, Adam moments and the EMA over that many devices (README, "Pods").
"""
from fdistill import configs


def get_config():
    c = configs.base("score", data="tfds:cifar10", model="unet")
    c.data.label_key = ""  # unconditional
    c.model.channels = 128
    c.model.channel_mult = (2, 2, 2)
    c.model.num_res_blocks = 4
    c.model.num_heads = 4
    c.model.emb_dim = 512
    c.model.dropout = 0.13  # EDM's CIFAR-10 dropout
    c.train.num_steps = 400_000  # EDM: 200M images at batch 512
    c.train.batch_size = 512
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 5000
    c.train.ema_decay = 0.9999
    c.train.log_every = 500
    c.train.checkpoint_every = 10_000
    c.eval.num_samples = 10_000
    c.eval.num_steps = 18  # Heun: NFE = 35
    c.eval.chunk = 500
    return c
