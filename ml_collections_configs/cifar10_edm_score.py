"""EDM's CIFAR-10 teacher: DDPM++ (EDM's SongUNet), class-conditional, with EDM's training settings.

    python -m experiments.run --config ml_collections_configs/cifar10_edm_score.py --workdir runs/edm_cifar10 \
        --config.data.data_dir=DIR --config.mesh.fsdp=8
    python -m experiments.count_params --config ml_collections_configs/cifar10_edm_score.py   # 55.7M

The network is EDM's `SongUNet` with its published CIFAR-10 configuration (arXiv 2206.00364, Table 7;
NVlabs/edm `train.py --arch=ddpmpp --cond=1`): 128 channels x (2, 2, 2), 4 blocks per level,
attention at 16x16, positional noise embedding, dropout 0.13, 10 classes, and the 9 augmentation
labels of EDM's augmentation pipeline (`augment_dim=9`; this project does not augment, so they stay
zero: the parameters exist so that EDM's checkpoints load). `--config.model.num_classes=0`: the
unconditional network; `--config.model.name=edm_ncsnpp`: NCSN++. Training as EDM's: batch 512,
Adam lr 1e-3 after a 10M-image ramp, EMA half-life 0.5M images, 200M images. Not trained by this
project: the usual path is EDM's published weights (`python -m experiments.convert_edm --pkl
edm-cifar10-32x32-cond-vp.pkl --out runs/edm_cifar10_cond`, which writes this config with the
pickle's fields). Needs CIFAR-10 prepared as a local TFDS dataset in DIR.

FID: `--config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's weights,
https://github.com/mseitzer/pytorch-fid/releases; required: the run stops at start-up without them)
and `--config.data.fid_reference=cifar10-32x32.npz` for `fid` against EDM's reference statistics
(`fd_inception` is FID against `data.num_reference` training images).
"""
from fdistill import configs


def get_config():
    c = configs.base("score", data="tfds:cifar10", model="edm_ddpmpp")
    c.data.label_key = "label"
    c.data.feature_fn = "fdistill.evaluation.fid:inception"  # FID's Inception-v3 pool features
    c.data.fid_reference = ""  # EDM's cifar10-32x32.npz (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) for 'fid'
    c.model.num_classes = 10
    c.train.num_steps = 390_625  # 200M images
    c.train.batch_size = 512
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 19_531  # EDM's lr ramp-up over 10M images
    c.train.grad_clip = 0.0  # EDM does not clip
    c.train.ema_decay = 0.99929  # half-life 0.5M images at batch 512
    c.train.log_every = 500
    c.train.checkpoint_every = 10_000
    c.eval.num_samples = 50_000  # FID's sample count
    c.eval.num_steps = 18  # Heun, NFE 35 (EDM's CIFAR-10 sampler)
    c.eval.chunk = 500
    return c
