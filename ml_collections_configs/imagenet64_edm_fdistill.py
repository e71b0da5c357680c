"""f-distill (arXiv 2502.15681) of EDM's ImageNet 64x64 ADM teacher into a one-step generator, with
the settings of NVlabs FastGen's `EDM/config_f_distill_in64.py`.

    PYTHONPATH=/path/to/NVlabs/edm python -m experiments.convert_edm \
        --pkl edm-imagenet-64x64-cond-adm.pkl --out runs/edm_in64
    python -m experiments.run --config ml_collections_configs/imagenet64_edm_fdistill.py --workdir runs/fdistill_in64 \
        --config.distill.teacher=runs/edm_in64 --config.data.data_dir=DIR --config.mesh.fsdp=8

The teacher is EDM's published ADM checkpoint (295.9M parameters) converted to a score run. FastGen's
ImageNet-64 choices: Jensen-Shannon (`js`; the paper's 1.16 FID), 600k generator updates at batch
512, AdamW lr 2e-6 and weight decay 0.01, generator clipping at norm 10, 4 critic updates per
generator update, GAN weight 3e-3, ratio bins of equal width in sigma with EMA 0.5, the fake score
trained with the unweighted x0 MSE, noise indices 2..998, generator EMA 0.9999, one discriminator
head on the teacher's 8x8 bottleneck, mixed precision (bfloat16 activations). Hardware: about
1.6e21 FLOP for the run (211 GFLOP per ADM forward pass, ~24 passes per image per step), some
3,500 A100-hours at 40% MFU; one step holds four ~296M-parameter networks, about 9.5 GB of float32
parameters and Adam state before activations: an 8-GPU or TPU pod job (`mesh.fsdp` shards them).
Not trained or stepped here (its parameter count and the CIFAR-10 config's steps are tested).

FID: `--config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's weights,
https://github.com/mseitzer/pytorch-fid/releases; required: the run stops at start-up without them)
and `--config.data.fid_reference=imagenet-64x64.npz` for `fid` against EDM's reference statistics
(`fd_inception` is FID against `data.num_reference` training images).
"""
from fdistill import configs


def get_config():
    c = configs.base("distill", data="tfds:imagenet_resized/64x64", model="edm_adm")
    c.data.label_key = "label"
    c.model.num_classes = 1000  # the teacher's (its whole model section is adopted)
    c.data.feature_fn = "fdistill.evaluation.fid:inception"  # FID's Inception-v3 pool features
    c.data.fid_reference = ""  # EDM's imagenet-64x64.npz (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) for 'fid'
    c.distill.teacher = "runs/edm_in64"
    c.distill.divergence = "js"
    c.distill.lambda_gan = 3e-3
    c.distill.fake_updates_per_gen = 4
    c.distill.critic_loop = "scan"
    c.distill.fake_loss = "x0_mse"
    c.distill.ratio_binning = "sigma"
    c.distill.ratio_ema = 0.5
    c.distill.gen_index_min = 2
    c.distill.gen_index_max = 998
    c.distill.disc_on = "teacher"
    c.distill.disc_heads = 1
    c.distill.gen_ema_decay = 0.9999
    c.distill.critic_grad_clip = 0.0
    c.train.grad_clip = 10.0
    c.train.weight_decay = 0.01
    c.train.learning_rate = 2e-6
    c.train.num_steps = 600_000
    c.train.batch_size = 512
    c.train.compute_dtype = "bfloat16"
    c.train.log_every = 500
    c.train.checkpoint_every = 5000
    c.eval.num_samples = 50_000
    c.eval.num_steps = 40
    c.eval.chunk = 250
    return c
