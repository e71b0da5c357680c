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

* The rest of TRL 1.x's DPOTrainer loss types, under TRL's names (delta = pi - ref, eps =
  `label_smoothing`, each cited at its function): `robust` (rDPO), `exo_pair` (EXO), `nca_pair`,
  `bco_pair`, `sppo_hard`, `aot` / `aot_unpaired` (cDPO on batch-sorted margins: these couple the
  examples of a batch), `apo_zero` / `apo_down`, `discopop` (`discopop_tau`); and `cpo` (TRL
  CPOTrainer: reference-free sigmoid + `cpo_alpha` NLL).
* `nll_norm` (rpo, orpo, cpo): the NLL term per example, -pi_w / |y_w| as the RPO and ORPO papers
  write it ('example'), or TRL's token-weighted batch mean -sum(pi_w) / sum(|y_w|) ('batch');
  see `chosen_nll`.

Metrics follow TRL's names: `rewards/chosen`, `rewards/rejected` (the implicit rewards each loss
compares: beta (pi - ref) for dpo/cdpo/ipo/hinge/rpo and TRL's DPOTrainer losses, beta (pi - ref) / |y| for ln_dpo,
beta pi / |y| for simpo/orpo, beta pi for cpo, u(s err) for mapo), `rewards/accuracies` (fraction with
chosen > rejected, ties count as wrong), `rewards/margins`, `logps/chosen`, `logps/rejected` (the
policy's implicit log-likelihoods), all batch means; `nll` for rpo/orpo/cpo (TRL logs it as
`nll_loss`), `log_odds_ratio` for orpo (TRL's `log_odds_chosen`; TRL's `log_odds_ratio` is the mean
log sigmoid of it). TRL 1.x's CPO/ORPO log per-token-averaged logps; here `logps/*` are always the
summed ones the loss received.

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
    """A loss parameter: its default (the config field's; its type is the parameter's) and the
    values it accepts."""

    default: float | str
    valid: Callable[[float | str], bool] = lambda v: True
    expected: str = ""


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable  # (pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, **params) -> (loss [B], metrics)
    params: dict[str, Param]  # this loss's parameters and the values it accepts
    needs: tuple[str, ...]  # arguments that must not be None


REFERENCE = ("ref_chosen_logps", "ref_rejected_logps")
LENGTHS = ("chosen_lengths", "rejected_lengths")
REGISTRY: dict[str, Loss] = {}
PARAMS: dict[str, Param] = {}  # every loss parameter, by name (one config field each)
ALIASES = {"diffusion_dpo": "dpo"}


def register(name: str, *, params: dict[str, Param] | None = None, needs: tuple[str, ...] = REFERENCE):
    """Decorator adding a loss function to the registry under `name`. A parameter shared by several
    losses (one config field) has one default; each loss may accept a different range of it."""

    def deco(fn: Callable) -> Callable:
        if name in REGISTRY or name in ALIASES:
            raise ValueError(f"preference loss {name!r} registered twice")
        for k, p in (params or {}).items():
            if PARAMS.setdefault(k, p).default != p.default:
                raise ValueError(f"preference-loss parameter {k!r} is declared with two defaults")
        REGISTRY[name] = Loss(name, fn, dict(params or {}), tuple(needs))
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
NLL_NORM = Param("example", lambda v: v in ("example", "batch"), "'example' or 'batch'")


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


def chosen_nll(pi_w, len_w, nll_norm: str):
    """The SFT term of rpo / orpo / cpo: the chosen responses' negative log-likelihood per token.

    'example' (the RPO and ORPO papers' per-sequence form): -pi_w / |y_w| of each pair.
    'batch' (TRL's trainers): one token-weighted mean over the batch, -sum(pi_w) / sum(|y_w|), the
    same number for every pair (a gradient-accumulation micro-batch is its own batch, as in TRL;
    TRL's ORPO also counts the prompt tokens, which this does not see). They agree when every
    chosen response has the same length."""
    if nll_norm == "batch":
        return jnp.broadcast_to(-jnp.sum(pi_w) / jnp.sum(len_w), pi_w.shape)
    return -pi_w / len_w


@register("rpo", params={"alpha": ALPHA, "nll_norm": NLL_NORM}, needs=REFERENCE + LENGTHS[:1])
def rpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, alpha, nll_norm):
    """DPO + alpha NLL(y_w) (arXiv 2405.16436), NLL = -pi_w / |y_w| or TRL's batch mean (`chosen_nll`)."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    nll = chosen_nll(pi_w, len_w, nll_norm)
    return -jax.nn.log_sigmoid(bh) + alpha * nll, trl_metrics(r_w, r_l, pi_w, pi_l, nll=nll)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) below -log 2. Inputs are clipped to <= -1e-6 so that a response of probability
    one gives a large finite value instead of -inf."""
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@register("orpo", params={"lambda_": LAMBDA, "nll_norm": NLL_NORM}, needs=LENGTHS)
def orpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, lambda_, nll_norm):
    """-a_w - lambda_ log sigmoid(log odds_w - log odds_l), a = pi / |y| (arXiv 2403.07691, eqs. 4-7);
    the NLL term -a_w is per example or TRL's batch mean (`chosen_nll`)."""
    a_w, a_l = pi_w / len_w, pi_l / len_l
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    nll = chosen_nll(pi_w, len_w, nll_norm)
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


# ----- the rest of TRL 1.x's DPOTrainer loss types (trl/trainer/dpo_trainer.py) and CPO ----------------
# delta_w = pi_w - ref_w, delta_l = pi_l - ref_l, h = delta_w - delta_l, s = sigmoid, b = beta,
# eps = label_smoothing; rewards/* are b delta as TRL logs them.

EXO_LABEL_SMOOTHING = Param(LABEL_SMOOTHING.default, lambda v: 0.0 < v < 0.5, "in (0, 0.5) (exo_pair takes log eps)")
DISCOPOP_TAU = Param(0.05, **POSITIVE)
CPO_ALPHA = Param(1.0, **NON_NEGATIVE)


@register("robust", params={"label_smoothing": LABEL_SMOOTHING})
def robust(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, label_smoothing):
    """[-(1 - eps) log s(b h) + eps log s(-b h)] / (1 - 2 eps): rDPO, unbiased under label noise eps
    (Chowdhury et al., arXiv 2403.00409, eq. 9)."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    eps = label_smoothing
    loss = (-(1.0 - eps) * jax.nn.log_sigmoid(bh) + eps * jax.nn.log_sigmoid(-bh)) / (1.0 - 2.0 * eps)
    return loss, trl_metrics(r_w, r_l, pi_w, pi_l)


@register("exo_pair", params={"label_smoothing": EXO_LABEL_SMOOTHING})
def exo_pair(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, label_smoothing):
    """KL(q || p) over {chosen, rejected}, q = (s(b h), s(-b h)), p = (1 - eps, eps): EXO-pref
    (Ji et al., arXiv 2402.00856, eq. 16, K = 2)."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    eps = label_smoothing
    log_qw, log_ql = jax.nn.log_sigmoid(bh), jax.nn.log_sigmoid(-bh)
    loss = jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))
    return loss, trl_metrics(r_w, r_l, pi_w, pi_l)


@register("nca_pair")
def nca_pair(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """-log s(b delta_w) - log s(-b delta_w) / 2 - log s(-b delta_l) / 2: NCA (Chen et al.,
    arXiv 2402.05369, pairwise form)."""
    _, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    loss = -jax.nn.log_sigmoid(r_w) - 0.5 * jax.nn.log_sigmoid(-r_w) - 0.5 * jax.nn.log_sigmoid(-r_l)
    return loss, trl_metrics(r_w, r_l, pi_w, pi_l)


@register("bco_pair")
def bco_pair(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """-log s(b delta_w) - log s(-b delta_l): BCO's pairwise form (Jung et al., arXiv 2404.04656),
    as TRL 1.x has it (without the running-mean reward shift of TRL <= 0.28)."""
    _, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    return -jax.nn.log_sigmoid(r_w) - jax.nn.log_sigmoid(-r_l), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("sppo_hard")
def sppo_hard(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """(delta_w - 1/(2b))^2 + (delta_l + 1/(2b))^2: SPPO (Wu et al., arXiv 2405.00675, eq. 4.7)
    with the hard win probabilities P(chosen wins) = 1, P(rejected wins) = 0."""
    _, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    loss = (pi_w - ref_w - 0.5 / beta) ** 2 + (pi_l - ref_l + 0.5 / beta) ** 2
    return loss, trl_metrics(r_w, r_l, pi_w, pi_l)


def _sorted_cdpo(d, beta, eps):
    return -(1.0 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)


@register("aot", params={"label_smoothing": LABEL_SMOOTHING})
def aot(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, label_smoothing):
    """cDPO on sort(pi_w - pi_l) - sort(ref_w - ref_l), both sorted over the batch: AOT, the
    first-order stochastic dominance of the policy's margins over the reference's (Melnyk et al.,
    arXiv 2406.05882). Example i of the loss is the i-th order statistic, not pair i: the loss
    couples the whole batch (under `jit` on a sharded batch, the global one; with gradient
    accumulation, each micro-batch)."""
    _, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    d = jnp.sort(pi_w - pi_l, axis=0) - jnp.sort(ref_w - ref_l, axis=0)
    return _sorted_cdpo(d, beta, label_smoothing), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("aot_unpaired", params={"label_smoothing": LABEL_SMOOTHING})
def aot_unpaired(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, label_smoothing):
    """cDPO on sort(delta_w) - sort(delta_l) over the batch: AOT for unpaired data (arXiv
    2406.05882); batch coupling as for `aot`."""
    _, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    d = jnp.sort(pi_w - ref_w, axis=0) - jnp.sort(pi_l - ref_l, axis=0)
    return _sorted_cdpo(d, beta, label_smoothing), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("apo_zero")
def apo_zero(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """1 - s(b delta_w) + s(b delta_l): APO-zero (D'Oosterlinck et al., arXiv 2408.06266, eq. 7),
    for chosen responses better than the policy's own."""
    _, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    return 1.0 - jax.nn.sigmoid(r_w) + jax.nn.sigmoid(r_l), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("apo_down")
def apo_down(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """s(b delta_w) + 1 - s(b h): APO-down (arXiv 2408.06266, eq. 8), for chosen responses worse
    than the policy's own."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    return jax.nn.sigmoid(r_w) + 1.0 - jax.nn.sigmoid(bh), trl_metrics(r_w, r_l, pi_w, pi_l)


@register("discopop", params={"discopop_tau": DISCOPOP_TAU})
def discopop(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, discopop_tau):
    """(1 - m) (-log s(b h)) + m exp(-b h), m = s(b h / tau): DiscoPOP's log-ratio modulated loss
    (Chan et al., arXiv 2406.08414, eq. 5). exp(-b h) is evaluated at max(b h, -50): for b h below
    -50, m < exp(-50 / tau) is 0 in float32 and the clamp only keeps 0 * inf out of the gradient."""
    bh, r_w, r_l = _dpo_terms(pi_w, pi_l, ref_w, ref_l, beta)
    m = jax.nn.sigmoid(bh / discopop_tau)
    loss = (1.0 - m) * -jax.nn.log_sigmoid(bh) + m * jnp.exp(-jnp.maximum(bh, -50.0))
    return loss, trl_metrics(r_w, r_l, pi_w, pi_l)


@register("cpo", params={"cpo_alpha": CPO_ALPHA, "nll_norm": NLL_NORM}, needs=LENGTHS[:1])
def cpo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, cpo_alpha, nll_norm):
    """-log s(b (pi_w - pi_l)) + cpo_alpha NLL(y_w): CPO (Xu et al., arXiv 2401.08417, eq. 6;
    TRL CPOTrainer `sigmoid`), reference-free, summed log-probabilities; NLL as `chosen_nll`."""
    r_w, r_l = beta * pi_w, beta * pi_l
    nll = chosen_nll(pi_w, len_w, nll_norm)
    return -jax.nn.log_sigmoid(r_w - r_l) + cpo_alpha * nll, trl_metrics(r_w, r_l, pi_w, pi_l, nll=nll)


LOSSES = tuple(REGISTRY)
REFERENCE_FREE = tuple(n for n, loss in REGISTRY.items() if not set(REFERENCE) & set(loss.needs))
KNOWN_PARAMS = tuple(sorted(PARAMS))


# ----- the front ------------------------------------------------------------------------------------


def config_fields() -> dict[str, float | str]:
    """{parameter: default} of every loss: the loss-parameter fields of `config.po` and `config.dpo`."""
    return {k: p.default for k, p in sorted(PARAMS.items())}


def is_reference_free(name: str) -> bool:
    """Whether loss `name` (or its alias) reads no reference log-likelihoods."""
    return ALIASES.get(name, name) in REFERENCE_FREE


def _typed(k: str, v):
    return type(PARAMS[k].default)(v)


def params_from(section) -> dict[str, float | str]:
    """The loss parameters a config section (`config.po`, `config.dpo`) holds."""
    return {k: _typed(k, section[k]) for k in KNOWN_PARAMS}


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
    specs = REGISTRY[ALIASES.get(name, name)].params
    p = {k: _typed(k, params.get(k, spec.default)) for k, spec in specs.items()}
    for k, v in p.items():
        if not specs[k].valid(v):
            raise ValueError(f"{section}.{k} must be {specs[k].expected}, got {v!r} ({section}.{loss_field}={name!r})")
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


def kto_loss(pi, ref, desirable, pi_kl, ref_kl, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-example loss [B], metrics) of KTO (Ethayarajh et al., arXiv 2402.01306, eqs. 7-8; TRL
    KTOTrainer `kto`) on unpaired examples, `desirable` [B] 1 or 0:

        r = pi - ref,   z_ref = max(0, mean_B(pi_kl - ref_kl)),  held constant (stop_gradient),
        loss = lambda_D (1 - sigmoid(beta (r - z_ref)))   for a desirable example,
               lambda_U (1 - sigmoid(beta (z_ref - r)))   for an undesirable one,

    with pi_kl, ref_kl the log-probabilities of mismatched completions (prompt i, response of
    another example), the batch estimate of KL(pi || pi_ref) that the paper calls the reference
    point (under `jit` on a sharded batch, the global batch's mean, as TRL gathers it). Metrics:
    `kl` (z_ref), `rewards/chosen` / `rewards/rejected` (mean beta r over the desirable /
    undesirable examples), `rewards/margins`, `logps/chosen` / `logps/rejected`, `frac_desirable`."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    pi, ref, d, pi_kl, ref_kl = map(f32, (pi, ref, desirable, pi_kl, ref_kl))
    z_ref = jax.lax.stop_gradient(jnp.maximum(jnp.mean(pi_kl - ref_kl), 0.0))
    r = pi - ref
    loss = jnp.where(d > 0.5, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z_ref))),
                     undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z_ref - r))))
    n_d, n_u = jnp.maximum(jnp.sum(d), 1.0), jnp.maximum(jnp.sum(1.0 - d), 1.0)
    r_w, r_l = jnp.sum(d * beta * r) / n_d, jnp.sum((1.0 - d) * beta * r) / n_u
    metrics = {"kl": z_ref, "rewards/chosen": r_w, "rewards/rejected": r_l, "rewards/margins": r_w - r_l,
               "logps/chosen": jnp.sum(d * pi) / n_d, "logps/rejected": jnp.sum((1.0 - d) * pi) / n_u,
               "frac_desirable": jnp.mean(d)}
    return loss, metrics


def token_logps(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-token log-probabilities of the masked tokens, [B, T - 1]: entry t - 1 is
    loss_mask[b, t] * log_softmax(logits[b, t - 1])[tokens[b, t]] (token t is scored by the
    prediction after reading tokens[:t]); float32 whatever the logits' dtype."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens[:, 1:]
    token_logp = jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return token_logp * loss_mask[:, 1:].astype(jnp.float32)


def sequence_logps(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed log-probability of the masked tokens of each sequence, [B]:

        logp[b] = sum_{t >= 1} loss_mask[b, t] * log_softmax(logits[b, t - 1])[tokens[b, t]]

    (`token_logps` summed). `loss_mask` [B, T] is 1 on response tokens (including the
    end-of-sequence token) and 0 on the prompt and padding; `loss_mask[:, 0]` is ignored (the first
    token has no prediction). Computed in float32 whatever the logits' dtype.
    """
    return jnp.sum(token_logps(logits, tokens, loss_mask), axis=-1)
