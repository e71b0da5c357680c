"""One registry of preference losses for language and diffusion models (the DPO family and MaPO).

A loss sees *implicit log-likelihoods*, per pair (batch axis first): pi_w, pi_l of the policy for
the chosen (winner) and rejected (loser) sample, ref_w, ref_l of the frozen reference (None for the
reference-free losses), and lengths |y_w|, |y_l|:

* language models (`fdistill.objectives.language`): pi is the *summed* token log-probability of a
  response (`sequence_logps`) and |y| its token count; the length-normalised losses divide by it.
* diffusion models (`fdistill.objectives.diffusion_preference`): pi = -err / 2 with err the pair's
  denoising error (the Gaussian log-likelihood of the denoising step up to constants; Wallace et
  al., arXiv 2311.12908, eqs. 9-14), and |y| = 1.

With the log-ratio margin h = (pi_w - ref_w) - (pi_l - ref_l):

* `dpo`    (Rafailov et al., arXiv 2305.18290, eq. 7):   -log sigmoid(beta h).
           `diffusion_dpo` is the same loss: with pi = -err/2 it is Diffusion-DPO (arXiv 2311.12908,
           eq. 14) -log sigmoid(-(beta/2) [(err_w - err_w^ref) - (err_l - err_l^ref)]), eq. 14's
           beta T omega(lambda_t) folded into beta with the 1/2 of the public code
           (SalesforceAIResearch/DiffusionDPO `train.py`: `scale_term = -0.5 * beta_dpo`).
* `cdpo`   conservative DPO (Mitchell 2023 note; TRL `label_smoothing`), labels flipped with
           probability eps:  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
* `ipo`    (Azar et al., arXiv 2310.12036, eq. 17):  (h - 1 / (2 beta))^2   (beta is IPO's tau).
           The paper's h uses summed log-probabilities, as here (TRL's `ipo` averages them).
* `hinge`  SLiC-HF calibration loss with a reference (Zhao et al., arXiv 2305.10425; TRL `hinge`):
           max(0, 1 - beta h)
* `ln_dpo` length-normalised DPO ("The Hitchhiker's Guide to Human Alignment with *PO"):
           -log sigmoid(beta [(pi_w - ref_w) / |y_w| - (pi_l - ref_l) / |y_l|])
* `simpo`  (Meng et al., arXiv 2405.14734, eq. 6), reference-free:
           -log sigmoid(beta pi_w / |y_w| - beta pi_l / |y_l| - gamma)
* `rpo`    (Liu et al., arXiv 2405.16436; TRL `rpo_alpha`): DPO + alpha * (-pi_w / |y_w|), the
           length-normalised NLL of the chosen response (the SFT term that regularises DPO).
* `orpo`   (Hong et al., arXiv 2403.07691, eqs. 4-7), reference-free; with the length-normalised
           log-likelihood a(y) = pi(y) / |y| and log odds(y) = a(y) - log(1 - exp(a(y))):
           -a(y_w) - lambda_ log sigmoid(log odds(y_w) - log odds(y_l))
* `mapo`   (Hong et al., arXiv 2406.06424; public code mapo-t2i/mapo `utils.py::compute_loss`),
           reference-free; with err = -2 pi (the diffusion error) and the bounded odds link
           u(x) = x / (exp(x) - 1):   err_w - beta log sigmoid(T [u(s err_w) - u(s err_l)]),
           s = `snr_value` (0.5 in the public code), T = `margin_scale` (its 1000 time steps).

Metrics follow TRL's names: `rewards/chosen`, `rewards/rejected` (the implicit rewards each loss
compares: beta (pi - ref) for dpo/cdpo/ipo/hinge/rpo, beta (pi - ref) / |y| for ln_dpo,
beta pi / |y| for simpo/orpo, u(s err) for mapo), `rewards/accuracies` (fraction with
chosen > rejected, ties count as wrong), `rewards/margins`, `logps/chosen`, `logps/rejected` (the
policy's implicit log-likelihoods), all batch means; `nll` for rpo/orpo, `log_odds_ratio` for orpo.

Adding a loss is one function here, decorated with `@register(name, params=..., needs=...)` and
returning (per-example loss, `trl_metrics(...)`), and one NumPy test in
tests/test_preference_losses.py. It then works as `config.po.loss` (language) and
`config.dpo.method` (diffusion), and its parameters become fields of both sections
(`fdistill.configs`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Param:
    """A loss parameter: its default (the config field's) and the values it accepts."""

    default: float
    valid: Callable[[float], bool] = lambda v: True
    expected: str = ""


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable  # (pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, **params) -> (loss [B], metrics)
    params: tuple[str, ...]
    needs: tuple[str, ...]  # arguments that must not be None


REFERENCE = ("ref_chosen_logps", "ref_rejected_logps")
LENGTHS = ("chosen_lengths", "rejected_lengths")
REGISTRY: dict[str, Loss] = {}
PARAMS: dict[str, Param] = {}  # every loss parameter, by name (one config field each)
ALIASES = {"diffusion_dpo": "dpo"}


def register(name: str, *, params: dict[str, Param] | None = None, needs: tuple[str, ...] = REFERENCE):
    """Decorator adding a loss function to the registry under `name`."""

    def deco(fn: Callable) -> Callable:
        if name in REGISTRY or name in ALIASES:
            raise ValueError(f"preference loss {name!r} registered twice")
        for k, p in (params or {}).items():
            if PARAMS.setdefault(k, p) is not p:
                raise ValueError(f"preference-loss parameter {k!r} is declared twice with different specs")
        REGISTRY[name] = Loss(name, fn, tuple(params or ()), tuple(needs))
        return fn

    return deco


def trl_metrics(r_w, r_l, pi_w, pi_l, **extra) -> dict[str, jax.Array]:
    """Batch means of the implicit rewards (TRL's names) and of the policy's log-likelihoods."""
    return {
        "rewards/chosen": jnp.mean(r_w),
        "rewards/rejected": jnp.mean(r_l),
        "rewards/accuracies": jnp.mean((r_w > r_l).astype(jnp.float32)),
        "rewards/margins": jnp.mean(r_w - r_l),
        "logps/chosen": jnp.mean(pi_w),
        "logps/rejected": jnp.mean(pi_l),
        **{k: jnp.mean(v) for k, v in extra.items()},
    }


# ----- the losses -----------------------------------------------------------------------------------

NON_NEGATIVE = dict(valid=lambda v: v >= 0, expected=">= 0")
POSITIVE = dict(valid=lambda v: v > 0, expected="> 0")
LABEL_SMOOTHING = Param(0.1, lambda v: 0.0 <= v < 0.5, "in [0, 0.5)")
GAMMA = Param(0.5)
ALPHA = Param(1.0, **NON_NEGATIVE)
LAMBDA = Param(0.1, **NON_NEGATIVE)
SNR_VALUE = Param(0.5, **POSITIVE)
MARGIN_SCALE = Param(1000.0, **POSITIVE)


def _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta):
    """(beta h, rewards/chosen, rewards/rejected) of the DPO margin."""
    ratio_w, ratio_l = pi_w - ref_w, pi_l - ref_l
    return beta * (ratio_w - ratio_l), beta * ratio_w, beta * ratio_l


@register("dpo")
def dpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """-log sigmoid(beta h) (arXiv 2305.18290, eq. 7; Diffusion-DPO on pi = -err/2)."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    return -jax.nn.log_sigmoid(bh), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("cdpo", params={"label_smoothing": LABEL_SMOOTHING})
def cdpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, label_smoothing):
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (conservative DPO)."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    eps = label_smoothing
    loss = -(1.0 - eps) * jax.nn.log_sigmoid(bh) - eps * jax.nn.log_sigmoid(-bh)
    return loss, trl_metrics(r_w, r_l, pi_w, pi_l)


@register("ipo")
def ipo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """(h - 1 / (2 beta))^2 (arXiv 2310.12036, eq. 17)."""
    ratio_w, ratio_l = pi_w - ref_w, pi_l - ref_l
    loss = ((ratio_w - ratio_l) - 1.0 / (2.0 * beta)) ** 2
    return loss, trl_metrics(beta * ratio_w, beta * ratio_l, pi_w, pi_l)


@register("hinge")
def hinge(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """max(0, 1 - beta h) (SLiC-HF with a reference, arXiv 2305.10425)."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    return jax.nn.relu(1.0 - bh), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("ln_dpo", needs=REFERENCE + LENGTHS)
def ln_dpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """-log sigmoid(beta [(pi_w - ref_w) / |y_w| - (pi_l - ref_l) / |y_l|])."""
    ratio_w, ratio_l = (pi_w - ref_w) / len_w, (pi_l - ref_l) / len_l
    loss = -jax.nn.log_sigmoid(beta * (ratio_w - ratio_l))
    return loss, trl_metrics(beta * ratio_w, beta * ratio_l, pi_w, pi_l)


@register("simpo", params={"gamma": GAMMA}, needs=LENGTHS)
def simpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, gamma):
    """-log sigmoid(beta pi_w / |y_w| - beta pi_l / |y_l| - gamma) (arXiv 2405.14734, eq. 6)."""
    r_w, r_l = beta * pi_w / len_w, beta * pi_l / len_l
    return -jax.nn.log_sigmoid(r_w - r_l - gamma), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("rpo", params={"alpha": ALPHA}, needs=REFERENCE + LENGTHS[:1])
def rpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, alpha):
    """DPO + alpha (-pi_w / |y_w|) (arXiv 2405.16436)."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    nll = -pi_w / len_w
    return -jax.nn.log_sigmoid(bh) + alpha * nll, trl_metrics(r_w, r_l, pi_w, pi_l, nll=nll)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) below -log 2. Inputs are clipped to <= -1e-6 so that a response of probability
    one gives a large finite value instead of -inf."""
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@register("orpo", params={"lambda_": LAMBDA}, needs=LENGTHS)
def orpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, lambda_):
    """-a_w - lambda_ log sigmoid(log odds_w - log odds_l), a = pi / |y| (arXiv 2403.07691, eqs. 4-7)."""
    a_w, a_l = pi_w / len_w, pi_l / len_l
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    nll = -a_w
    loss = nll - lambda_ * jax.nn.log_sigmoid(log_odds)
    return loss, trl_metrics(beta * a_w, beta * a_l, pi_w, pi_l, nll=nll, log_odds_ratio=log_odds)


def odds_link(u):
    """u / (exp(u) - 1) for u >= 0, with value 1 at u = 0 (MaPO's bounded odds link).

    Written as u exp(-u) / (1 - exp(-u)) (no overflow at large u) and with a first-order series
    below 1e-6 (no 0/0 at u = 0, in the value or the gradient).
    """
    small = u < 1e-6
    safe = jnp.where(small, 1.0, u)
    return jnp.where(small, 1.0 - 0.5 * u, safe * jnp.exp(-safe) / -jnp.expm1(-safe))


@register("mapo", params={"snr_value": SNR_VALUE, "margin_scale": MARGIN_SCALE}, needs=())
def mapo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, snr_value, margin_scale):
    """err_w - beta log sigmoid(T [u(s err_w) - u(s err_l)]), err = -2 pi (arXiv 2406.06424)."""
    err_w, err_l = -2.0 * pi_w, -2.0 * pi_l
    u_w, u_l = odds_link(snr_value * err_w), odds_link(snr_value * err_l)
    loss = err_w - beta * jax.nn.log_sigmoid(margin_scale * (u_w - u_l))
    return loss, trl_metrics(u_w, u_l, pi_w, pi_l)


LOSSES = tuple(REGISTRY)
REFERENCE_FREE = tuple(n for n, loss in REGISTRY.items() if not set(REFERENCE) & set(loss.needs))
KNOWN_PARAMS = tuple(sorted(PARAMS))


# ----- the front ------------------------------------------------------------------------------------


def config_fields() -> dict[str, float]:
    """{parameter: default} of every loss: the loss-parameter fields of `config.po` and `config.dpo`."""
    return {k: p.default for k, p in sorted(PARAMS.items())}


def is_reference_free(name: str) -> bool:
    """Whether loss `name` (or its alias) reads no reference log-likelihoods."""
    return ALIASES.get(name, name) in REFERENCE_FREE


def params_from(section) -> dict[str, float]:
    """The loss parameters a config section (`config.po`, `config.dpo`) holds."""
    return {k: float(section[k]) for k in KNOWN_PARAMS}


def check_params(name: str, beta: float, params: dict, section: str = "po", loss_field: str = "loss"
                 ) -> dict[str, float]:
    """The parameters of loss `name` with defaults filled in; an unknown loss or parameter and bad
    values fail naming the config field (`<section>.<loss_field>`, `<section>.<param>`) and what
    is allowed."""
    allowed = list(REGISTRY) + list(ALIASES)
    if name not in allowed:
        raise ValueError(f"{section}.{loss_field}={name!r} is not a known preference loss; allowed: {allowed}")
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown preference-loss parameter(s) {unknown}; known: {list(KNOWN_PARAMS)}")
    if not float(beta) > 0:
        raise ValueError(f"{section}.beta must be > 0, got {beta}")
    p = {k: float(params.get(k, PARAMS[k].default)) for k in REGISTRY[ALIASES.get(name, name)].params}
    for k, v in p.items():
        if not PARAMS[k].valid(v):
            raise ValueError(f"{section}.{k} must be {PARAMS[k].expected}, got {v}")
    return p


def preference_loss(name: str, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *, beta: float,
                    **params) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-example loss [B], metrics) of the registered loss `name` (see the module docstring).

    Log-likelihoods are [B] each (language: summed over response tokens); lengths are response
    token counts (clamped to >= 1). The reference log-likelihoods may be None for the
    reference-free losses (`REFERENCE_FREE`); other losses raise a ValueError. Extra keyword
    parameters (`KNOWN_PARAMS`: e.g. `label_smoothing` for cdpo, `gamma` for simpo) take their
    defaults when absent; those of other losses are ignored.
    """
    p = check_params(name, beta, params)
    loss = REGISTRY[ALIASES.get(name, name)]
    given = dict(zip(REFERENCE + LENGTHS, (ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)))
    missing = [k for k in loss.needs if given[k] is None]
    if missing:
        hint = f"; only {list(REFERENCE_FREE)} are reference-free" if set(missing) & set(REFERENCE) else ""
        raise ValueError(f"preference loss {name!r} needs {', '.join(missing)} (got None){hint}")
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    pi_w, pi_l, ref_w, ref_l = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps))
    len_w, len_l = (None if x is None else jnp.maximum(f32(x), 1.0) for x in (chosen_lengths, rejected_lengths))
    return loss.fn(pi_w, pi_l, ref_w, ref_l, len_w, len_l, float(beta), **p)


def sequence_logps(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed log-probability of the masked tokens of each sequence, [B].

    `logits[b, t]` is the model's next-token prediction after reading tokens[b, :t + 1], so token
    t >= 1 is scored by logits[b, t - 1]:

        logp[b] = sum_{t >= 1} loss_mask[b, t] * log_softmax(logits[b, t - 1])[tokens[b, t]].

    `loss_mask` [B, T] is 1 on response tokens (including the end-of-sequence token) and 0 on the
    prompt and padding; `loss_mask[:, 0]` is ignored (the first token has no prediction).
    Computed in float32 whatever the logits' dtype.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens[:, 1:]
    token_logp = jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(token_logp * loss_mask[:, 1:].astype(jnp.float32), axis=-1)
