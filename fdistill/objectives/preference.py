"""Pure preference-optimisation losses (the DPO family) and sequence log-probabilities.

Notation (per pair, batch axis first): pi_w, pi_l are the policy's *summed* token log-probabilities
of the chosen (winner) and rejected (loser) responses, ref_w, ref_l the reference policy's, |y_w|,
|y_l| the response lengths in tokens, and

    h = (pi_w - ref_w) - (pi_l - ref_l)                               (the DPO log-ratio margin)

* `dpo`    (Rafailov et al., arXiv 2305.18290, eq. 7):   -log sigmoid(beta h)
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

Metrics follow TRL's names: `rewards/chosen`, `rewards/rejected` (the implicit rewards each loss
compares: beta (pi - ref) for dpo/cdpo/ipo/hinge/rpo, beta (pi - ref) / |y| for ln_dpo,
beta pi / |y| for simpo/orpo), `rewards/accuracies` (fraction with chosen > rejected, ties count
as wrong), `rewards/margins`, `logps/chosen`, `logps/rejected` (summed policy log-probabilities),
all batch means; `nll` for rpo/orpo and `log_odds_ratio` for orpo.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# name -> the extra parameters it reads (with defaults)
LOSS_PARAMS: dict[str, dict[str, float]] = {
    "dpo": {},
    "cdpo": {"label_smoothing": 0.1},
    "ipo": {},
    "hinge": {},
    "ln_dpo": {},
    "simpo": {"gamma": 0.5},
    "rpo": {"alpha": 1.0},
    "orpo": {"lambda_": 0.1},
}
LOSSES = tuple(LOSS_PARAMS)
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALISED = ("ln_dpo", "simpo", "rpo", "orpo")
KNOWN_PARAMS = tuple(sorted({p for ps in LOSS_PARAMS.values() for p in ps}))


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


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) below -log 2. Inputs are clipped to <= -1e-6 so that a response of probability
    one gives a large finite value instead of -inf."""
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _require(name: str, **arrays) -> None:
    missing = [k for k, v in arrays.items() if v is None]
    if missing:
        raise ValueError(f"preference loss {name!r} needs {', '.join(missing)} (got None); "
                         f"only {list(REFERENCE_FREE)} are reference-free")


def _dpo_like(name, pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, p):
    _require(name, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l)
    ratio_w, ratio_l = pi_w - ref_w, pi_l - ref_l
    extra = {}
    if name == "ln_dpo":
        _require(name, chosen_lengths=len_w, rejected_lengths=len_l)
        ratio_w, ratio_l = ratio_w / len_w, ratio_l / len_l
    h = ratio_w - ratio_l
    if name in ("dpo", "ln_dpo", "rpo"):
        loss = -jax.nn.log_sigmoid(beta * h)
    elif name == "cdpo":
        eps = p["label_smoothing"]
        loss = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif name == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    elif name == "hinge":
        loss = jax.nn.relu(1.0 - beta * h)
    else:  # pragma: no cover - guarded by preference_loss
        raise AssertionError(name)
    if name == "rpo":
        _require(name, chosen_lengths=len_w)
        nll = -pi_w / len_w
        loss = loss + p["alpha"] * nll
        extra["nll"] = jnp.mean(nll)
    return loss, beta * ratio_w, beta * ratio_l, extra


def _simpo(name, pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, p):
    _require(name, chosen_lengths=len_w, rejected_lengths=len_l)
    r_w, r_l = beta * pi_w / len_w, beta * pi_l / len_l
    return -jax.nn.log_sigmoid(r_w - r_l - p["gamma"]), r_w, r_l, {}


def _orpo(name, pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, p):
    _require(name, chosen_lengths=len_w, rejected_lengths=len_l)
    a_w, a_l = pi_w / len_w, pi_l / len_l
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    nll = -a_w
    loss = nll - p["lambda_"] * jax.nn.log_sigmoid(log_odds)
    return loss, beta * a_w, beta * a_l, {"nll": jnp.mean(nll), "log_odds_ratio": jnp.mean(log_odds)}


_IMPLS: dict[str, Callable] = {n: _dpo_like for n in ("dpo", "cdpo", "ipo", "hinge", "ln_dpo", "rpo")}
_IMPLS.update(simpo=_simpo, orpo=_orpo)


def check_params(name: str, beta: float, params: dict, field: str = "po") -> dict[str, float]:
    """The loss's parameters with defaults filled in; unknown names and bad values fail with the
    config field (`<field>.<param>`) and the allowed values."""
    if name not in LOSS_PARAMS:
        raise ValueError(f"{field}.loss={name!r} is not a known preference loss; allowed: {list(LOSSES)}")
    unknown = sorted(set(params) - set(KNOWN_PARAMS))
    if unknown:
        raise ValueError(f"unknown preference-loss parameter(s) {unknown}; known: {list(KNOWN_PARAMS)}")
    if not float(beta) > 0:
        raise ValueError(f"{field}.beta must be > 0, got {beta}")
    p = {k: float(params.get(k, d)) for k, d in LOSS_PARAMS[name].items()}
    if "label_smoothing" in p and not 0.0 <= p["label_smoothing"] < 0.5:
        raise ValueError(f"{field}.label_smoothing must be in [0, 0.5), got {p['label_smoothing']}")
    for k in ("alpha", "lambda_"):
        if k in p and not p[k] >= 0:
            raise ValueError(f"{field}.{k} must be >= 0, got {p[k]}")
    return p


def preference_loss(name: str, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None, *, beta: float,
                    **params) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-example loss [B], metrics) of the preference loss `name` (see the module docstring).

    Log-probabilities are summed over response tokens ([B] each); lengths are response token counts
    (clamped to >= 1). The reference log-probabilities may be None for the reference-free losses
    (`simpo`, `orpo`); other losses raise a ValueError. Extra keyword parameters: `label_smoothing`
    (cdpo), `gamma` (simpo), `alpha` (rpo), `lambda_` (orpo); parameters of other losses are ignored.
    """
    p = check_params(name, beta, params)
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    pi_w, pi_l, ref_w, ref_l = map(f32, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps))
    len_w, len_l = (None if x is None else jnp.maximum(f32(x), 1.0) for x in (chosen_lengths, rejected_lengths))
    loss, r_w, r_l, extra = _IMPLS[name](name, pi_w, pi_l, ref_w, ref_l, len_w, len_l, float(beta), p)
    metrics = {
        "rewards/chosen": jnp.mean(r_w),
        "rewards/rejected": jnp.mean(r_l),
        "rewards/accuracies": jnp.mean((r_w > r_l).astype(jnp.float32)),
        "rewards/margins": jnp.mean(r_w - r_l),
        "logps/chosen": jnp.mean(pi_w),
        "logps/rejected": jnp.mean(pi_l),
        **extra,
    }
    return loss, metrics
