"""EDM's ImageNet 64x64 teacher: ADM (EDM's DhariwalUNet), class-conditional, with EDM's settings.

    python -m experiments.run --config ml_collections_configs/imagenet64_edm_score.py --workdir runs/edm_in64 \
        --config.data.data_dir=DIR --config.mesh.fsdp=8
    python -m experiments.count_params --config ml_collections_configs/imagenet64_edm_score.py   # 295.9M

The network is EDM's `DhariwalUNet` with its published ImageNet-64 configuration (NVlabs/edm
`train.py --arch=adm --cond=1 --augment=0`): 192 channels x (1, 2, 3, 4), 3 blocks per level,
attention at 32, 16 and 8 pixels, dropout 0.10, 1000 classes. Training as EDM's: batch 4096, Adam
lr 2e-4 after a 10M-image ramp, EMA half-life 50M images, 2500M images, mixed precision. Not
trained by this project: the usual path is EDM's published weights (`python -m
experiments.convert_edm --pkl edm-imagenet-64x64-cond-adm.pkl --out runs/edm_in64`). Needs
`imagenet_resized/64x64` prepared as a local TFDS dataset in DIR.

FID: `--config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's weights,
https://github.com/mseitzer/pytorch-fid/releases; required: the run stops at start-up without them)
and `--config.data.fid_reference=imagenet-64x64.npz` for `fid` against EDM's reference statistics
(`fd_inception` is FID against `data.num_reference` training images).
"""
from fdistill import configs


def get_config():
    c = configs.base("score", data="tfds:imagenet_resized/64x64", model="edm_adm")
    c.data.label_key = "label"
    c.data.feature_fn = "fdistill.evaluation.fid:inception"  # FID's Inception-v3 pool features
    c.data.fid_reference = ""  # EDM's imagenet-64x64.npz (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) for 'fid'
    c.model.num_classes = 1000
    c.train.num_steps = 610_352  # 2500M images
    c.train.batch_size = 4096
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 2_441  # 10M images
    c.train.grad_clip = 0.0
    c.train.ema_decay = 0.999943  # half-life 50M images at batch 4096
    c.train.compute_dtype = "bfloat16"  # EDM trains ImageNet in fp16
    c.train.log_every = 500
    c.train.checkpoint_every = 10_000
    c.eval.num_samples = 50_000
    c.eval.num_steps = 40  # deterministic Heun, NFE 79 (EDM's best ImageNet numbers use 256 stochastic steps)
    c.eval.chunk = 250
    return c
