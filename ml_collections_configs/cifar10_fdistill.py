"""f-distill (arXiv 2502.15681) of the CIFAR-10-size EDM teacher into a one-step U-Net, sharded with FSDP.

    python -m experiments.run --config ml_collections_configs/cifar10_fdistill.py --workdir runs/cifar10_fdistill \
        --config.distill.teacher=runs/cifar10_score --config.data.data_dir=DIR --config.mesh.fsdp=8

A paper-size config, not trained by this project: `benchmarks/fsdp_memory.py` compiles and steps it.
One step holds four U-Nets of the teacher's size (the frozen teacher, the generator and the fake
score with Adam moments, the discriminator head on the fake score's bottleneck): 82.8M parameters
each, about 3.3 GB of float32 parameters and optimiser state before activations, which
`mesh.fsdp` splits over the devices (README, "Pods"). The generator and the fake score copy the
teacher's architecture and weights (`config.distill.teacher`, the workdir of cifar10_score.py).
"""
from fdistill import configs


def get_config():
    c = configs.base("distill", data="tfds:cifar10", model="unet")  # the model is the teacher's (copied)
    c.data.label_key = ""
    c.distill.teacher = "runs/cifar10_score"
    c.distill.divergence = "js"
    c.distill.fake_updates_per_gen = 5
    c.distill.critic_loop = "scan"
    c.distill.lambda_gan = 3e-3
    c.distill.disc_on = "fake_score"
    c.distill.lr_gen = 1e-5
    c.distill.lr_fake = 1e-5
    c.distill.lr_disc = 1e-5
    c.train.num_steps = 100_000
    c.train.batch_size = 256
    c.train.learning_rate = 1e-5
    c.train.log_every = 500
    c.train.checkpoint_every = 5000
    c.eval.num_samples = 10_000
    c.eval.num_steps = 18
    c.eval.chunk = 500
    return c
