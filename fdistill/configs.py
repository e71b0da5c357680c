"""Configs as data: one base of defaults per objective family, one loader, strict checks.

Every default lives here, once. An experiment file in `ml_collections_configs/` starts from a base
and states only what differs:

    from fdistill import configs

    def get_config():
        c = configs.base("distill", data="gmm", model="mlp")
        c.distill.divergence = "js"
        return c

`base(family, data=..., model=...)` assembles the sections of a family (`score`, `flow`, `distill`, `sft`,
`po`, `hf`, `diffusion_po`, `diffusion_rl`) with the data section of a data source (`gmm`, `digits`,
`tfds`, `trl`) and the model section of a network (`mlp`, `unet`, `transformer`, `hf`). `complete(config)` fills a partial
config (an old `config.json`, a test's config) from its base and rejects fields the base does not
have, naming the closest valid ones; `check_overrides` does the same for command-line overrides
(`--config.a.b=v`), including the expected type. Objectives read fields directly
(`config.distill.ratio_bins`), never with a `.get(field, default)` that would restate a default.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
from typing import Any, Iterable

import ml_collections
from ml_collections import config_dict

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ml_collections_configs")

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A config field that does not exist, has the wrong type or an invalid value."""


def _section(**fields) -> ConfigDict:
    return ConfigDict(fields)


def optional(kind: type, default=None):
    """A field that may stay unset (None); overrides are parsed as `kind`."""
    return config_dict.placeholder(kind) if default is None else default


# ----- data sources --------------------------------------------------------------------------------


def data(name: str) -> ConfigDict:
    """The `config.data` section of a data source (`fdistill.data`)."""
    if name == "gmm":
        return _section(
            name="gmm",
            layout="ring",  # ring | grid | random
            num_modes=8,
            dim=2,
            mode_std=0.05,
            radius=1.0,
            imbalance=1.0,  # largest / smallest mode weight
            seed=0,  # places the modes (random layout), orders the weights and the batches
            num_train=0,  # 0 = fresh exact samples every step; n > 0 = batches from one fixed set of n points
        )
    if name == "digits":
        return _section(
            name="digits",
            resolution=8,  # 8 | 16
            data_dir="",  # '' = $FDISTILL_DATA_DIR or ~/.cache/fdistill/tfds
            seed=0,  # epoch shuffling
        )
    if name == "tfds" or name.startswith("tfds:"):
        return _section(
            name=name if name.startswith("tfds:") else "tfds:",
            data_dir="",
            seed=0,
            split="train",
            image_key="image",
            label_key="label",  # '' = unconditional
            allow_download=False,
            feature_fn="",  # 'package.module:function' ('fdistill.evaluation.fid:inception': FID's); '' = 8x8 pixels
            num_reference=5000,  # data images whose features are the metric's reference
            fid_reference="",  # '' or reference statistics (.npz with mu, sigma; EDM's fid-refs) for the 'fid' metric
        )
    if name == "trl":
        return _section(
            name="trl",
            path="",  # local .jsonl or .parquet in a TRL format (standard or conversational)
            test_path="",  # held-out rows; '' = a seeded test_fraction of `path`'s rows
            test_fraction=0.05,
            max_prompt_length=optional(int),  # prompt tokens kept (their end; TRL 0.x's rule); None = all
            max_completion_length=optional(int),  # response tokens kept (their start); None = all
            max_length=1024,  # prompt + response tokens (TRL's default): the sequence length of every batch
            truncation_mode="keep_start",  # keep_start | keep_end: how TRL cuts a sequence over max_length
            data_dir="",  # the tokenized dataset (TFDS ArrayRecord); '' = <path without suffix>_tfds
            seed=0,  # epoch shuffling
        )
    raise ConfigError(f"config.data.name={name!r} has no base; known: ['gmm', 'digits', 'tfds:<name>', 'trl']")


def _data_kind(name: str) -> str:
    return "tfds" if str(name).startswith("tfds") else str(name)


# ----- models --------------------------------------------------------------------------------------


def model(name: str) -> ConfigDict:
    """The `config.model` section of a network (`fdistill.models`)."""
    # parametrisation: what the diffusion network's output means (fdistill.denoiser.build_denoiser):
    # edm (D = c_skip x + c_out F(c_in x; ln(sigma)/4)) | velocity (flow matching: F(x_t, t) = dx_t/dt)
    if name == "mlp":
        return _section(name="mlp", width=128, depth=3, emb_dim=64, num_classes=0, dropout=0.0,
                        out_init="zeros", parametrisation="edm")  # out_init: zeros (D = c_skip x at init) | lecun
    if name == "unet":
        return _section(name="unet", channels=32, channel_mult=(1, 2), num_res_blocks=2, attention=True,
                        num_heads=1, emb_dim=128, num_classes=0, dropout=0.0, parametrisation="edm")
    if name == "transformer":
        return _section(name="transformer", width=64, depth=2, num_heads=4, mlp_ratio=4)
    if name in ("edm_ddpmpp", "edm_ncsnpp"):  # EDM's SongUNet (fdistill.models.edm_song), its CIFAR-10 configs
        ncsn = name == "edm_ncsnpp"
        return _section(name=name, model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                        attn_resolutions=(16,), dropout=0.13, label_dropout=0.0, num_classes=0, augment_dim=9,
                        embedding_type="fourier" if ncsn else "positional", channel_mult_noise=2 if ncsn else 1,
                        encoder_type="residual" if ncsn else "standard", decoder_type="standard",
                        resample_filter=(1, 3, 3, 1) if ncsn else (1, 1), parametrisation="edm")
    if name == "edm_adm":  # EDM's DhariwalUNet (fdistill.models.edm_adm), its ImageNet-64 config
        return _section(name=name, model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                        attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0, num_classes=0, augment_dim=0,
                        parametrisation="edm")
    if name == "hf":
        return _section(
            name="hf",
            hf_path="",  # a Hugging Face checkpoint directory: config.json, *.safetensors, tokenizer files
            param_dtype="float32",  # float32 | bfloat16: the loaded weights (the trained ones and the reference)
            remat=False,  # recompute each layer's activations in the backward pass
        )
    raise ConfigError(f"config.model.name={name!r} has no base; known: ['mlp', 'unet', 'transformer', 'hf', "
                      f"'edm_ddpmpp', 'edm_ncsnpp', 'edm_adm']")


# ----- shared sections -----------------------------------------------------------------------------


def diffusion() -> ConfigDict:
    """EDM noise schedule and preconditioning (arXiv 2206.00364, Table 1)."""
    return _section(sigma_data=0.5, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0, rho=7.0)


def train() -> ConfigDict:
    """The loop's fields (`fdistill.train`) and the default optimiser (`fdistill.train_state`)."""
    return _section(
        num_steps=1000,
        batch_size=128,
        seed=0,
        log_every=100,
        eval_every=0,  # 0 = only at the end
        checkpoint_every=1000,
        checkpoint_every_secs=1800.0,  # also save when this much wall time has passed since the last save (0 = never)
        keep_checkpoints=2,
        learning_rate=1e-3,
        lr_schedule="constant",  # constant | cosine (to 0 at num_steps, which then fixes the trajectory)
        warmup_steps=0,
        grad_clip=1.0,  # global-norm clipping; 0 = none
        weight_decay=0.0,  # AdamW
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        ema_decay=0.0,  # 0 = no parameter EMA
        compute_dtype="float32",  # float32 | bfloat16 (activations; parameters stay float32)
        grad_accum_steps=1,  # micro-batches per step (divides batch_size)
    )


def mesh() -> ConfigDict:
    """`config.mesh`: the ('data', 'fsdp') device mesh and the parameter sharding rules
    (`fdistill.sharding.ShardingRules`)."""
    return _section(
        fsdp=1,  # devices per parameter shard group; data = devices / fsdp
        min_shard_size=2**14,  # leaves with fewer elements stay replicated
        rules=(),  # ('regex=spec', ...) over leaf paths, first match wins; spec 'replicate' or e.g. 'None,fsdp'
    )


def flow() -> ConfigDict:
    """`config.flow`: flow-matching training of a velocity network (`fdistill.objectives.flow_matching`,
    `fdistill.objectives.meanflow`)."""
    return _section(
        t_distribution="logit_normal",  # logit_normal (t = sigmoid(t_mean + t_std n)) | uniform
        t_mean=0.0,
        t_std=1.0,
        # MeanFlow (objective meanflow): pairs r <= t both drawn from the t distribution
        meanflow_ratio=0.25,  # fraction of pairs with r < t (the rest r = t: plain flow matching)
        meanflow_p=1.0,  # adaptive loss weight 1 / (|delta|^2 + meanflow_c)^p (0 = plain squared error)
        meanflow_c=1e-3,
        meanflow_time_scale=0.1,  # the network sees (t, t - r) times this (its jvp differentiates the embedding)
    )


def sample_eval() -> ConfigDict:
    """Evaluation of a diffusion sampler on the data source's metrics."""
    return _section(num_samples=8192, num_steps=18, sampler="heun", chunk=4096,
                    inception_weights="")  # the FID Inception weights file (fdistill.evaluation.fid)


# ----- families ------------------------------------------------------------------------------------


def distill() -> ConfigDict:
    """`config.distill`: f-distill / DMD2 / VSD and their few-step students (`fdistill.distill`)."""
    return _section(
        teacher="analytic",  # 'analytic' (GMM only) or the workdir of a finished score run
        allow_unfinished_teacher=False,
        # the objective
        divergence="js",  # rkl | kl | js | sh | jf | sf | pearson | neyman | alpha
        alpha=0.5,  # divergence='alpha' only (h = r^alpha)
        divergence_end="",  # '' = none; else h moves linearly from divergence's to this one's over training
        lambda_gan=1e-3,  # generator GAN loss weight
        teacher_error_norm=True,  # DMD weight w = 1 / mean|x - D_real|
        lambda_reg=0.0,  # DMD's regression loss weight (one-step 'distill' only): MSE to the teacher's ODE endpoint
        lambda_reg_end=optional(float),  # None = lambda_reg throughout; else it moves linearly to this by num_steps
        reg_batch_size=16,  # lambda_reg > 0: fresh noises per generator update whose ODE endpoints are computed
        num_sigmas=1000,  # Karras grid of the distillation noise levels
        gen_index_min=20,
        gen_index_max=980,
        gen_index_max_end=-1,  # >= 0: the upper index moves linearly from gen_index_max to this by train.num_steps
        ratio_binning="index",  # index (10 equal-count bins of the grid index) | sigma (FastGen: equal-width in sigma)
        ratio_bins=10,  # 0 = no per-bin normalisation
        ratio_ema=0.0,
        logit_clip=10.0,
        ratio_min=0.1,
        ratio_max=20.0,
        # the critic
        critic="learned",  # learned (fake score + discriminator) | oracle (exact; analytic mixture teacher only)
        oracle_samples=4096,  # critic='oracle': generator samples in its kernel density
        fake_updates_per_gen=5,  # critic (fake score + discriminator) updates per generator update (TTUR)
        critic_loop="scan",  # scan | unroll (unroll for conv nets on CPU)
        fake_loss="edm",  # edm (lambda(sigma)-weighted DSM) | x0_mse (FastGen: unweighted)
        fake_sigma="karras",  # karras (index-uniform) | lognormal (EDM training distribution)
        disc_on="fake_score",  # fake_score (head on its features) | separate (own trunk) | teacher (heads on the frozen teacher's features)
        disc_heads=1,  # disc_on='teacher': heads whose logits are averaged
        disc_loss_weight=1.0,
        disc_hidden=128,
        disc_depth=2,
        step_aware_critic=False,  # few-step: condition the critic on the student step
        # the student (the objective names the sampler: distill | dmd2_multistep | tdm)
        gen_sigma=80.0,  # G(z) = D_gen(gen_sigma z; gen_sigma)
        latent_dim=0,  # one-step generator: z of this dimension (0 = the data's; vector data, fresh generator)
        latent_categories=0,  # one-step generator: a uniform category of this many (one-hot) besides z (0 = none)
        latent_continuous_scale=1.0,  # with latent_categories: the continuous z enters the network times this
        gen_out_init="",  # '' = config.model.out_init | zeros | lecun (the generator's output layer)
        num_student_steps=1,
        student_sigmas="karras",  # or K comma-separated decreasing floats
        sampler_seed=0,  # keys the few-step sampler's fresh re-noising noise at evaluation
        tdm_snr_clip=5.0,
        tdm_importance_weight=True,
        # consistency models (objectives cd, ct; fdistill.objectives.consistency)
        cm_scales_min=10,  # discretisation N of [sigma_min, sigma_max]: doubles from min to max over the run (iCT)
        cm_scales_max=1280,  # cd: usually min = max (a fixed grid)
        cm_sigma_sampling="lognormal",  # lognormal (iCT: interval i with prob. of ln sigma ~ N(cm_p_mean, cm_p_std^2)) | uniform
        cm_p_mean=-1.1,
        cm_p_std=2.0,
        cm_loss="pseudo_huber",  # pseudo_huber (iCT: sqrt(|d|^2 + c^2) - c, c = cm_huber_c sqrt(dim)) | l2
        cm_huber_c=0.00054,
        cm_schedule="ict",  # ict (the Karras grid, its doubling curriculum) | ect (ct only: ECT's continuous r(t))
        cm_ect_q=2.0,  # ECT: r = t (1 - q^-(a+1) (1 + k sigmoid(-b t))), clamped at 0, in stage a of cm_ect_stages
        cm_ect_k=8.0,
        cm_ect_b=1.0,
        cm_ect_stages=8,  # equal stages over train.num_steps (dt / t shrinks by q per stage)
        # continuous-time consistency models (objective scm; fdistill.objectives.scm, TrigFlow): levels
        # ln(sigma_d tan t) ~ N(cm_p_mean, cm_p_std^2)
        scm_tangent="teacher",  # teacher (sCD: the teacher's PF-ODE velocity) | data (sCT: cos(t) z - sin(t) x0)
        scm_tangent_warmup=10000,  # updates over which the tangent's second term ramps in (r: 0 -> 1); 0 = none
        scm_tangent_norm=True,  # tangent normalisation g / (||g|| + scm_tangent_c) (False: g as it is)
        scm_tangent_c=0.1,
        scm_adaptive_weight=True,  # learned weight w(t): e^w / D ||F - target||^2 - w (False: w = 0)
        scm_mid_t=1.1,  # TrigFlow time of the 2-step sampler's second step (K steps: fdistill.objectives.scm)
        scm_time_conditioning="trigflow",  # trigflow (network sees scm_time_scale * t) | edm (ln(sigma)/4; teachers)
        scm_time_scale=0.1,
        # BOSS (objective boss; fdistill.objectives.boss): num_student_steps is the step budget N
        boss_fine_steps=200,  # M: the fine uniform t grid of the reference trajectories and the step-size search
        boss_cost_samples=1024,  # trajectories averaged in the cost of each step
        boss_pool_size=16384,  # teacher trajectories (at the schedule's times) the straightening trains on
        # optimisers (None = config.train's value)
        lr_gen=optional(float),
        lr_fake=optional(float),
        lr_disc=optional(float),
        gen_lr_schedule=optional(str),  # None = train.lr_schedule
        critic_grad_clip=optional(float),
        gen_ema_decay=0.0,
        # evaluation
        ratio_eval_sigma_min=0.05,
        ratio_eval_sigma_max=2.0,
    )


def po() -> ConfigDict:
    """`config.po`: preference optimisation of a language policy (`fdistill.objectives.language`)."""
    return _section(
        loss="dpo",  # any loss of fdistill.objectives.preference
        beta=0.1,
        **preference_loss_params(),  # label_smoothing (cdpo), gamma (simpo), alpha (rpo), lambda_ (orpo), ...
        reward_model="",  # workdir of a finished 'reward_model' run to optimise against ('' = the true reward)
        reward_width=128,  # objective reward_model: its bag-of-words MLP
        reward_depth=2,
        group_size=8,  # grpo, rloo: responses sampled per prompt in the step (online_dpo: 2)
        clip_eps=0.2,  # grpo: ratio clipping
        desirable_weight=1.0,  # kto: lambda_D (TRL's name)
        undesirable_weight=1.0,  # kto: lambda_U
        precompute_ref=True,  # reference log-probs computed once, not in every step
        reference="sft",  # sft (the run in sft_workdir) | init (random reference of config.model, demonstrator pairs)
        sft_workdir="",  # workdir of a finished 'sft' run with this config's task and model
        init_seed=0,  # reference='init' only
        data_dir="",  # preference pairs; '' = <sft_workdir>/preference_data
        pairs=_section(num_pairs=4096, num_test_pairs=512, bt_temperature=0.25, sample_temperature=1.0, seed=0),
    )


def preference_loss_params() -> dict:
    """One field per parameter of the preference-loss registry (`fdistill.objectives.preference`),
    with its default: `config.po` and `config.dpo` accept every loss, so both carry all of them."""
    from fdistill.objectives.preference import config_fields  # the registry declares them

    return config_fields()


def task() -> ConfigDict:
    """`config.task`: the known-reward synthetic language (`fdistill.data.preference`)."""
    return _section(vocab_size=32, response_len=12, length_cost=0.1, demo_target_prob=0.5, demo_max_words=11,
                    heldout_frac=0.2, seed=0)


def lm_eval() -> ConfigDict:
    """`config.eval` of the language objectives (responses on the held-out prompts)."""
    return _section(samples_per_prompt=8, temperature=1.0, num_heldout=2048, num_pairs=512, use_ema=True,
                    chunk=1024)


def hf_po() -> ConfigDict:
    """`config.po` of the Hugging Face objectives (`fdistill.objectives.hf_language`)."""
    return _section(
        loss="dpo",  # any loss of fdistill.objectives.preference
        beta=0.1,
        **preference_loss_params(),
        precompute_ref=False,  # True: the reference log-probs of every pair once, before training (one device)
        sft_workdir="",  # start (and take the reference) from a finished 'hf_sft' run instead of model.hf_path
    )


def hf_eval() -> ConfigDict:
    """`config.eval` of the Hugging Face objectives: held-out pairs and sampled responses."""
    return _section(num_pairs=256, num_samples=4, max_new_tokens=64, temperature=0.0, use_ema=False)


def diffusion_po() -> ConfigDict:
    """`config.dpo`, `config.reward`, `config.pairs`: diffusion preference optimisation."""
    c = ConfigDict()
    c.dpo = _section(
        method="diffusion_dpo",  # any loss of fdistill.objectives.preference (diffusion_dpo = dpo on -err/2)
        space="pixel",  # pixel | perceptual (errors in the reference network's features)
        beta=100.0,
        **preference_loss_params(),  # snr_value, margin_scale (mapo), label_smoothing, gamma, alpha, lambda_
        reference="",  # workdir of a finished 'score' run with this config's data, model and diffusion
    )
    c.reward = reward()
    c.pairs = _section(num_pairs=8192, temperature=0.1, seed=0, num_steps=0, dir="")
    return c


def reward() -> ConfigDict:
    """`config.reward`: a known reward of a diffusion model's samples (`fdistill.data.diffusion_preference`)."""
    return _section(kind="half_plane", angle_deg=22.5, offset=0.0, scale=1.0, modes=(0, 1, 2, 7),
                    smoothing=0.1, target_class=0)


def diffusion_rl() -> ConfigDict:
    """`config.rl`, `config.reward`: reward optimisation by policy gradient (`fdistill.objectives.find`,
    `fdistill.objectives.ddpo`); one train step = one batch of fresh samples and their rewards."""
    c = ConfigDict()
    c.rl = _section(
        sampler="",  # workdir of a finished score/flow run (FIND, DDPO) or distill/kd/dmd2_multistep/tdm run (FIND)
        sampler_steps=0,  # deterministic sampler of a score/flow run: steps (0 = its eval.num_steps, eval.sampler)
        clip_eps=0.2,  # PPO ratio clipping: min(rho A, clip(rho, 1 - eps, 1 + eps) A)
        advantage_norm="batch",  # batch | class (each class's own std) | none: A / (std + 1e-6)
        # FIND (arXiv 2407.19453): the initial noise z ~ N(mu_c, diag sigma_c^2)
        replay=4,  # batches (this step's and the last replay - 1) the clipped objective reuses
        kl_weight=1.0,  # + kl_weight * mean_c KL(N(mu_c, sigma_c^2) || N(0, I)) (summed over latent dimensions)
        baseline="calibration",  # calibration (a learned expected reward per class) | batch_mean | none
        lr_calib=optional(float),  # the calibration network's Adam rate (None = train.learning_rate)
        # DDPO (arXiv 2305.13301, DDPO_IS): the stochastic sampler's network is the policy
        ddpo_steps=20,  # Karras levels of the stochastic (ancestral) sampler
        ddpo_eta=1.0,  # 1 = DDPM-like ancestral noise, 0 = deterministic (no policy)
        inner_updates=4,  # Adam updates on each batch of trajectories (the first at ratio 1)
    )
    c.reward = reward()
    return c


DEFAULT_DATA = {"score": "gmm", "flow": "gmm", "distill": "gmm", "diffusion_po": "gmm", "diffusion_rl": "gmm",
                "hf": "trl"}
DEFAULT_MODEL = {"score": "mlp", "flow": "mlp", "distill": "mlp", "sft": "transformer", "po": "transformer", "hf": "hf",
                 "diffusion_po": "mlp", "diffusion_rl": "mlp"}
DIFFUSION_FAMILIES = ("score", "flow", "distill", "diffusion_po", "diffusion_rl")


def family_of(objective: str) -> str:
    """The config family an objective reads (declared where it registers: `objectives.register`)."""
    from fdistill.objectives import base as objectives_base

    return objectives_base.family(objective)  # a ConfigError for an unknown name


def base(objective: str, data: str | None = None, model: str | None = None) -> ConfigDict:
    """Every field of an `objective`'s config with its default (see the module docstring)."""
    family = family_of(objective)
    c = ConfigDict()
    c.objective = objective
    if family in DIFFUSION_FAMILIES:
        c.data = globals()["data"](data or DEFAULT_DATA[family])
        c.diffusion = diffusion()
        c.eval = sample_eval()
        if family in ("diffusion_po", "diffusion_rl"):
            c.eval.use_ema = True
    if family in ("sft", "po"):
        c.task = task()
        c.eval = lm_eval()
    if family == "hf":
        c.data = globals()["data"](data or DEFAULT_DATA[family])
        c.eval = hf_eval()
    c.model = globals()["model"](model or DEFAULT_MODEL[family])
    if family == "flow":
        c.model.parametrisation = "velocity"
        c.flow = flow()
    c.train = train()
    c.mesh = mesh()
    if family == "distill":
        c.distill = distill()
    elif family == "po":
        c.po = po()
    elif family == "hf":
        c.po = hf_po()
    elif family == "diffusion_po":
        c.update(diffusion_po())
    elif family == "diffusion_rl":
        c.update(diffusion_rl())
    return c


# ----- completing and checking ---------------------------------------------------------------------


def base_for(config) -> ConfigDict:
    """The base matching a (possibly partial) config: its objective, data source and model."""
    if "objective" not in config:
        raise ConfigError("config.objective is missing; every config names its objective")
    objective = config["objective"]
    data_name = config["data"]["name"] if "data" in config and "name" in config["data"] else None
    model_name = config["model"]["name"] if "model" in config and "name" in config["model"] else None
    return base(objective, data=_data_kind(data_name) if data_name else None, model=model_name)


def complete(config, where: str = "config") -> ConfigDict:
    """`config` with every field its base defines (missing fields take the base's defaults). Unknown
    fields raise a ConfigError naming the field and the closest valid names; values of the wrong
    type raise one naming the field and the expected type."""
    if isinstance(config, ConfigDict):
        config = config.to_dict()
    out = base_for(config)
    if "data" in config and "name" in config["data"]:
        out.data.name = config["data"]["name"]
    _merge(out, config, where)
    return out


def _merge(target: ConfigDict, values: dict, path: str) -> None:
    for key, value in values.items():
        field = f"{path}.{key}"
        if key not in target:
            raise ConfigError(unknown_field_message(field, target.keys(), path))
        current = target[key]
        if isinstance(current, ConfigDict):
            if not isinstance(value, (dict, ConfigDict)):
                raise ConfigError(f"{field} must be a section (dict), got {value!r}")
            _merge(current, dict(value), field)
            continue
        target[key] = coerce(field, value, target.get_type(key))


def unknown_field_message(field: str, valid: Iterable[str], section: str) -> str:
    name = field.rsplit(".", 1)[-1]
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = (f"did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close
            else f"valid fields of {section}: {', '.join(valid)}")
    return f"{field} is not a config field; {hint}"


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean (True/False)", str: "a string",
               tuple: "a tuple", list: "a list"}


def coerce(field: str, value: Any, kind: type) -> Any:
    """`value` as the field's type (ints are accepted for float fields; tuples and lists for each
    other, as JSON stores tuples as lists); a ConfigError otherwise."""
    if value is None or kind is type(None) or kind is object:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (tuple, list) and isinstance(value, (tuple, list)):
        return kind(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{field} expects {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")


def check_overrides(config: ConfigDict, argv: list[str], flag: str = "config") -> None:
    """Checks `--config.a.b=v` command-line overrides against `config` before they are applied:
    the field must exist (else the closest valid names) and `v` must parse as its type."""
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        path, _, text = arg[len(prefix):].partition("=")
        node, parts = config, path.split(".")
        for i, part in enumerate(parts):
            section = ".".join([flag] + parts[:i])
            if not isinstance(node, ConfigDict) or part not in node:
                valid = node.keys() if isinstance(node, ConfigDict) else []
                raise ConfigError(unknown_field_message(f"{section}.{part}", valid, section))
            if i < len(parts) - 1:
                node = node[part]
        kind = node.get_type(parts[-1])
        if kind in (int, float) and text:
            try:
                float(text) if kind is float else int(text)
            except ValueError:
                raise ConfigError(f"--{flag}.{path}={text!r}: {flag}.{path} expects "
                                  f"{_TYPE_NAMES[kind]}") from None
        if kind is bool and text.lower() not in ("true", "false", "1", "0", ""):
            raise ConfigError(f"--{flag}.{path}={text!r}: {flag}.{path} expects {_TYPE_NAMES[bool]}")


def override(config: ConfigDict, values: dict) -> ConfigDict:
    """Sets `values` ({'section.field': value}) in `config`, in place, and returns it; a field the
    config does not have is a ConfigError (ConfigDict would silently add it)."""
    for dotted, value in values.items():
        section, field = dotted.split(".")
        if section not in config or field not in config[section]:
            raise ConfigError(unknown_field_message(dotted, config[section] if section in config else config, section))
        config[section][field] = value
    return config


def parse_assignments(config: ConfigDict, texts: Iterable[str], flag: str = "set") -> dict:
    """{'section.field': value} from command-line texts 'section.field=value' (as `--config.`
    overrides are written), each value parsed as the field's type in `config`; an unknown field or a
    value that does not parse is a ConfigError naming it. Apply the result with `override`."""
    values = {}
    for text in texts:
        dotted, sep, raw = text.partition("=")
        parts = dotted.split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"--{flag}={text!r}: expected section.field=value, e.g. distill.lambda_gan=0.01")
        section, field = parts
        if section not in config or field not in config[section]:
            raise ConfigError(unknown_field_message(dotted, config[section] if section in config else config, section))
        kind = config[section].get_type(field)
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1")
            elif kind in (int, float):
                value = kind(raw)
            else:
                value = raw
        except ValueError:
            raise ConfigError(f"--{flag}={text!r}: {dotted} expects {_TYPE_NAMES.get(kind, kind.__name__)}") from None
        values[dotted] = value
    return values


# A generator without gmm_fdistill.py's 256 latent categories: z alone decides the sample.
CONTINUOUS_LATENT = {"distill.latent_categories": 0, "distill.latent_continuous_scale": 1.0}
# A z of the data's shape (students that start from a teacher network or map a noised data point).
DATA_SHAPED_LATENT = {"distill.latent_dim": 0, **CONTINUOUS_LATENT}
# gmm_fdistill.py's student before the categorical generator (student_quality.md, sessions 1-5):
# continuous 8-D z, distillation noise indices 150..350 throughout.
STUDENT_CONTINUOUS = {**CONTINUOUS_LATENT, "distill.gen_index_max": 350, "distill.gen_index_max_end": -1}
# The one-step student of gmm_fdistill.py before its student-quality study
# (experiments/results/student_quality.md): the settings the few-step and FastGen configs were
# measured with, and the study's `old` row.
STUDENT_BEFORE_STUDY = {
    **DATA_SHAPED_LATENT,
    "distill.lambda_gan": 1e-3, "distill.gen_index_min": 20, "distill.gen_index_max": 980,
    "distill.gen_index_max_end": -1, "distill.gen_lr_schedule": "constant",
    "train.num_steps": 2000, "train.log_every": 250, "train.checkpoint_every": 1000,
}


# ----- loading -------------------------------------------------------------------------------------


def config_path(name_or_path: str) -> str:
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    if not os.path.exists(path):
        available = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
        raise FileNotFoundError(f"config {name_or_path!r} not found; available in {CONFIG_DIR}: {available}")
    return path


def load(name_or_path: str) -> ConfigDict:
    """`get_config()` of an experiment file, given as a path or a name in ml_collections_configs/."""
    path = config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"fdistill_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_json(path: str) -> ConfigDict:
    """A workdir's `config.json`, completed from its base (fields added since it was written take
    their defaults)."""
    with open(path) as f:
        return complete(json.load(f), where="config")
