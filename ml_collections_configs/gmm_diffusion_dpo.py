"""Diffusion-DPO (arXiv 2311.12908) on a trained GMM diffusion model with a known half-plane reward.

    python -m experiments.run --config ml_collections_configs/gmm_diffusion_dpo.py --workdir runs/gmm_diffusion_dpo

The reference (and initial policy) is a finished score run: `--config.dpo.reference=<workdir>`. Left
empty, the score run of `config.dpo.teacher` (ml_collections_configs/gmm_score.py) is trained once into
~/.cache/fdistill/references/score-<hash> (or $FDISTILL_CACHE/references, or
`--config.dpo.reference_cache=DIR`) and reused by every run with the same teacher config. Preference
pairs are 2 x `pairs.num_pairs` reference samples, matched at random and labelled by Bradley-Terry on
the reward r(x) = n . x, n = (cos 22.5 deg, sin 22.5 deg) (4 of the 8 ring modes preferred); they are
stored as a local TFDS dataset under <reference>/preference_pairs/. Options:
`--config.dpo.beta=...`, `--config.dpo.space=perceptual` (errors in the reference network's feature
space, arXiv 2406.17636), `--config.reward.kind=mode_subset --config.reward.modes=(0,1)`.
results.json: reward_mean, preferred_frac, reward_gain (vs the reference), mmd_to_reference,
sample/* (mode coverage, weight TV, high-quality fraction, MMD to the data) and reference/*.
"""
import importlib.util
import os

import ml_collections


def teacher_config() -> ml_collections.ConfigDict:
    """ml_collections_configs/gmm_score.py: the reference model trained when dpo.reference is empty."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gmm_score.py")
    spec = importlib.util.spec_from_file_location("_fdistill_gmm_score_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "diffusion_po"

    c.dpo = ml_collections.ConfigDict()
    c.dpo.method = "diffusion_dpo"  # diffusion_dpo | mapo
    c.dpo.space = "pixel"  # pixel | perceptual
    c.dpo.beta = 100.0  # Diffusion-DPO beta (public code's beta_dpo: inside = -beta/2 * error difference)
    c.dpo.snr_value = 0.5  # MaPO only
    c.dpo.margin_scale = 1000.0  # MaPO only (T)
    c.dpo.reference = ""  # workdir of a finished score run; '' = train/reuse dpo.teacher
    c.dpo.reference_cache = ""  # '' = $FDISTILL_CACHE/references or ~/.cache/fdistill/references
    c.dpo.teacher = teacher_config()

    c.reward = ml_collections.ConfigDict()
    c.reward.kind = "half_plane"  # half_plane | mode_subset | classifier
    c.reward.angle_deg = 22.5
    c.reward.offset = 0.0
    c.reward.scale = 1.0
    c.reward.modes = (0, 1, 2, 7)  # mode_subset only
    c.reward.smoothing = 0.1  # mode_subset only

    c.pairs = ml_collections.ConfigDict()
    c.pairs.num_pairs = 8192
    c.pairs.temperature = 0.1  # Bradley-Terry: P(a > b) = sigmoid((r(a) - r(b)) / temperature)
    c.pairs.seed = 0
    c.pairs.num_steps = 0  # sampler steps for the pairs; 0 = the reference's eval.num_steps
    c.pairs.dir = ""  # '' = <reference>/preference_pairs

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 256  # pairs per step
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 0
    c.train.grad_clip = 1.0
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.0  # evaluate the raw fine-tuned parameters
    c.train.seed = 0
    c.train.log_every = 100
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.compute_dtype = "float32"

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 8192
    c.eval.num_steps = 18  # Heun: NFE 35
    c.eval.sampler = "heun"
    c.eval.chunk = 4096
    c.eval.use_ema = True
    return c
