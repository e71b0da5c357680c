"""f-divergences and their score-difference weightings h(r) = f''(r) r^2 (arXiv 2502.15681, Thm. 1).

With D_f(p || q) = E_q[f(p/q)] (f convex, f(1) = 0) and r = p_t / q_t the density ratio of the
noised teacher and student marginals, the f-distill generator gradient is

    grad_theta D_f(p_t || q_t) = - E[ h(r(x_t)) (grad log p_t(x_t) - grad log q_t(x_t))^T dx_t/dtheta ],
    h(r) = f''(r) r^2.

`h` is what the training loss uses; overall constants do not matter because f-distill divides h by
its batch mean. Each `Divergence` records `h_scale`, the constant c in h(r) = c f''(r) r^2 for the
chosen f (1 unless the conventional h differs from f''(r) r^2 by a constant; see the table in
`shared/reference/distillation.md` section 1.2):

    name      f(r)                                   h(r)            mode-seeking
    rkl       -log r                  (KL(q||p))     1               yes (DMD / VSD)
    kl        r log r                 (KL(p||q))     r               no
    js        r log r - (r+1) log((r+1)/2)           r / (1 + r)     no (bounded)
    sh        (sqrt(r) - 1)^2                        sqrt(r)  (c=2)  no
    jf        (r - 1) log r           (Jeffreys)     1 + r           no
    sf        (r+1) log((r+1)/(2r))   (softened RKL) 1 / (1 + r)     yes
    pearson   (r - 1)^2                              r^2      (c=1/2) no
    neyman    (1 - r)^2 / r                          1 / r    (c=1/2) yes
    alpha     (r^a - a r - (1 - a)) / (a (a - 1))    r^a             a <= 0: yes

All functions are jittable and act elementwise on arrays of positive ratios.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from fdistill.configs import ConfigError

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Divergence:
    """An f-divergence: `f(r)` (convex, f(1) = 0) and its weighting `h(r)` = h_scale * f''(r) r^2."""

    name: str
    f: Callable[[Array], Array]
    h: Callable[[Array], Array]
    h_scale: float = 1.0
    params: tuple = ()


def _xlogx(r):
    return r * jnp.log(r)


def _rkl() -> Divergence:
    return Divergence("rkl", lambda r: -jnp.log(r), lambda r: jnp.ones_like(r))


def _kl() -> Divergence:
    return Divergence("kl", _xlogx, lambda r: r)


def _js() -> Divergence:
    return Divergence(
        "js",
        lambda r: _xlogx(r) - (r + 1.0) * jnp.log((r + 1.0) / 2.0),
        lambda r: r / (1.0 + r),
    )


def _sh() -> Divergence:
    return Divergence("sh", lambda r: (jnp.sqrt(r) - 1.0) ** 2, jnp.sqrt, h_scale=2.0)


def _jf() -> Divergence:
    return Divergence("jf", lambda r: (r - 1.0) * jnp.log(r), lambda r: 1.0 + r)


def _sf() -> Divergence:
    return Divergence(
        "sf", lambda r: (r + 1.0) * jnp.log((r + 1.0) / (2.0 * r)), lambda r: 1.0 / (1.0 + r)
    )


def _pearson() -> Divergence:
    return Divergence("pearson", lambda r: (r - 1.0) ** 2, lambda r: r**2, h_scale=0.5)


def _neyman() -> Divergence:
    return Divergence(
        "neyman", lambda r: (1.0 - r) ** 2 / r, lambda r: 1.0 / jnp.maximum(r, 1e-8), h_scale=0.5
    )


def _alpha(alpha: float = 0.5) -> Divergence:
    """Amari alpha-divergence, h = r^alpha; alpha = 0 is reverse KL, alpha = 1 forward KL."""
    a = float(alpha)
    if a == 0.0:
        f = lambda r: -jnp.log(r)  # noqa: E731
    elif a == 1.0:
        f = _xlogx
    else:
        f = lambda r: (r**a - a * r - (1.0 - a)) / (a * (a - 1.0))  # noqa: E731
    return Divergence("alpha", f, lambda r: r**a, params=(("alpha", a),))


_REGISTRY: dict[str, Callable[..., Divergence]] = {
    "rkl": _rkl,
    "kl": _kl,
    "js": _js,
    "sh": _sh,
    "jf": _jf,
    "sf": _sf,
    "pearson": _pearson,
    "neyman": _neyman,
    "alpha": _alpha,
}

PARAMS = {"alpha": ("alpha",)}


def names() -> list[str]:
    """Registered divergence names."""
    return list(_REGISTRY)


def get(name: str, field: str = "divergence", **params) -> Divergence:
    """The divergence `name` (see module docstring); only 'alpha' takes a parameter (`alpha`).
    `field` is the config.distill field that named it (for the error)."""
    if name not in _REGISTRY:
        raise ConfigError(f"config.distill.{field}={name!r} is not known; allowed: {names()}")
    allowed = PARAMS.get(name, ())
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"divergence {name!r} takes parameters {list(allowed)}, got unexpected {unknown}"
        )
    return _REGISTRY[name](**params)


def from_config(distill_config, field: str = "divergence") -> Divergence:
    """`get(config.distill.<field>)` (divergence or divergence_end), passing `config.distill.alpha`
    to the alpha family."""
    name = distill_config[field]
    if name == "alpha":
        return get(name, field, alpha=float(distill_config.get("alpha", 0.5)))
    return get(name, field)
