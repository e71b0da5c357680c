"""f-distill (arXiv 2502.15681) of EDM's class-conditional CIFAR-10 teacher into a one-step generator,
with the settings of NVlabs FastGen's `EDM/config_f_distill_cifar10.py` (the paper's group's code).

    PYTHONPATH=/path/to/NVlabs/edm python -m experiments.convert_edm \
        --pkl edm-cifar10-32x32-cond-vp.pkl --out runs/edm_cifar10_cond
    python -m experiments.run --config ml_collections_configs/cifar10_edm_fdistill.py --workdir runs/fdistill_cifar10 \
        --config.distill.teacher=runs/edm_cifar10_cond --config.data.data_dir=DIR --config.mesh.fsdp=8

The teacher is EDM's published DDPM++ checkpoint converted to a score run (its 55.7M-parameter
SongUNet; the generator and the fake score copy its architecture and weights). FastGen's CIFAR-10
choices: forward KL (`kl`; the paper's reported 1.92 FID), 100k generator updates at batch 2048,
AdamW lr 1e-4 and weight decay 0.01 for the three networks, clipping (norm 10) on the generator
only, 4 critic updates per generator update, GAN weight 1e-3, the fake score trained with the
unweighted x0 MSE, ratio bins of equal width in sigma with no EMA, noise indices 2..998, generator
EMA 0.9999, and the discriminator's 3 heads on the frozen teacher's bottleneck features (FastGen
reads the teacher's 32, 16 and 8 pixel levels: a difference). Data and sampler metrics as
cifar10_edm_score.py. Hardware: 983 GFLOP per image per step (XLA's count), 2.0e20 FLOP for the
run, about 450 A100-hours at 40% MFU in bfloat16; one step holds four 55.7M-parameter networks
(teacher, generator and fake score with Adam moments, the generator's EMA, discriminator heads),
1.8 GB of float32 parameters and optimiser state before activations. Checked here only by compiling
and stepping it with a small converted network on random CIFAR-shaped data
(tests/test_edm_teachers.py), not trained.

FID: `--config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's weights,
https://github.com/mseitzer/pytorch-fid/releases; required: the run stops at start-up without them)
and `--config.data.fid_reference=cifar10-32x32.npz` for `fid` against EDM's reference statistics
(`fd_inception` is FID against `data.num_reference` training images).
"""
from fdistill import configs


def get_config():
    c = configs.base("distill", data="tfds:cifar10", model="edm_ddpmpp")  # the model is the teacher's (adopted)
    c.data.label_key = "label"
    c.model.num_classes = 10  # the teacher's (its whole model section is adopted)
    c.data.feature_fn = "fdistill.evaluation.fid:inception"  # FID's Inception-v3 pool features
    c.data.fid_reference = ""  # EDM's cifar10-32x32.npz (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) for 'fid'
    c.distill.teacher = "runs/edm_cifar10_cond"
    c.distill.divergence = "kl"
    c.distill.lambda_gan = 1e-3
    c.distill.fake_updates_per_gen = 4
    c.distill.critic_loop = "scan"
    c.distill.fake_loss = "x0_mse"
    c.distill.ratio_binning = "sigma"
    c.distill.ratio_ema = 0.0
    c.distill.gen_index_min = 2
    c.distill.gen_index_max = 998
    c.distill.disc_on = "teacher"
    c.distill.disc_heads = 3
    c.distill.gen_ema_decay = 0.9999
    c.distill.critic_grad_clip = 0.0  # FastGen clips the generator only
    c.train.grad_clip = 10.0
    c.train.weight_decay = 0.01
    c.train.learning_rate = 1e-4
    c.train.num_steps = 100_000
    c.train.batch_size = 2048
    c.train.log_every = 500
    c.train.checkpoint_every = 5000
    c.eval.num_samples = 50_000
    c.eval.num_steps = 18
    c.eval.chunk = 500
    return c
