"""The preference-loss registry (DPO family, MaPO) and `sequence_logps` against plain NumPy written
from the papers' formulas; Diffusion-DPO and MaPO through the registry against their old closed forms."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.objectives import preference as pl


def np_logsig(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, -np.log1p(np.exp(-np.abs(x))), x - np.log1p(np.exp(-np.abs(x))))


def np_mapo_link(u):
    """u / (exp(u) - 1), 1 at u = 0 (mapo-t2i/mapo utils.py::compute_loss)."""
    u = np.asarray(u, np.float64)
    return np.where(u == 0, 1.0, u / np.expm1(np.where(u == 0, 1.0, u)))


def np_loss(name, pw, pl_, rw, rl, lw, ll, beta, ls=0.1, gamma=0.5, alpha=1.0, lam=0.1, s=0.5, t=1000.0):
    """Each formula as printed in its paper (summed log-probabilities, lengths in tokens; MaPO on
    the diffusion error err = -2 logp)."""
    pw, pl_, rw, rl, lw, ll = (np.asarray(a, np.float64) for a in (pw, pl_, rw, rl, lw, ll))
    h = (pw - rw) - (pl_ - rl)
    if name == "dpo":  # 2305.18290 eq. 7
        return -np_logsig(beta * h), beta * (pw - rw), beta * (pl_ - rl)
    if name == "cdpo":
        return -(1 - ls) * np_logsig(beta * h) - ls * np_logsig(-beta * h), beta * (pw - rw), beta * (pl_ - rl)
    if name == "ipo":  # 2310.12036 eq. 17, tau = beta
        return (h - 1 / (2 * beta)) ** 2, beta * (pw - rw), beta * (pl_ - rl)
    if name == "hinge":
        return np.maximum(0, 1 - beta * h), beta * (pw - rw), beta * (pl_ - rl)
    if name == "ln_dpo":
        rw_, rl_ = beta * (pw - rw) / lw, beta * (pl_ - rl) / ll
        return -np_logsig(rw_ - rl_), rw_, rl_
    if name == "simpo":  # 2405.14734 eq. 6
        rw_, rl_ = beta * pw / lw, beta * pl_ / ll
        return -np_logsig(rw_ - rl_ - gamma), rw_, rl_
    if name == "rpo":
        return -np_logsig(beta * h) + alpha * (-pw / lw), beta * (pw - rw), beta * (pl_ - rl)
    if name == "orpo":  # 2403.07691 eqs. 4-7: odds = P / (1 - P), P = exp(mean token log-prob)
        aw, al = pw / lw, pl_ / ll
        odds_w, odds_l = np.exp(aw) / (1 - np.exp(aw)), np.exp(al) / (1 - np.exp(al))
        return -aw - lam * np_logsig(np.log(odds_w / odds_l)), beta * aw, beta * al
    if name == "mapo":  # 2406.06424, public code: err_w - beta log sigmoid(T [h(s err_w) - h(s err_l)])
        ew, el = -2 * pw, -2 * pl_
        hw, hl = np_mapo_link(s * ew), np_mapo_link(s * el)
        return ew - beta * np_logsig(t * (hw - hl)), hw, hl
    raise AssertionError(f"{name}: every registered loss needs its NumPy formula here")


def random_batch(rng, n=16, kind="random"):
    lw = rng.integers(1, 20, n).astype(np.float32)
    ll = rng.integers(1, 20, n).astype(np.float32)
    pw = -rng.uniform(0.2, 3.0, n).astype(np.float32) * lw
    pl_ = -rng.uniform(0.2, 3.0, n).astype(np.float32) * ll
    rw = -rng.uniform(0.2, 3.0, n).astype(np.float32) * lw
    rl = -rng.uniform(0.2, 3.0, n).astype(np.float32) * ll
    if kind == "equal":  # equal log-probs: every margin is exactly zero
        pl_, rw, rl, ll = pw.copy(), pw.copy(), pw.copy(), lw.copy()
    if kind == "large":  # large margins both ways (log-probabilities stay <= 0)
        down = rng.random(n) < 0.5
        pw = np.where(down, pw - 60.0, pw).astype(np.float32)
        pl_ = np.where(down, pl_, pl_ - 60.0).astype(np.float32)
    return pw, pl_, rw, rl, lw, ll


PARAMS = dict(label_smoothing=0.1, gamma=0.5, alpha=1.0, lambda_=0.1, snr_value=0.5, margin_scale=1000.0)


@pytest.mark.parametrize("name", pl.LOSSES)
def test_losses_match_numpy(name):
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda *a: pl.preference_loss(name, *a, beta=0.7, **PARAMS))
    for kind in ("random", "random", "equal", "large"):
        batch = random_batch(rng, kind=kind)
        want, rw, rl = np_loss(name, *batch, beta=0.7)
        for f in (fn, lambda *a: pl.preference_loss(name, *a, beta=0.7, **PARAMS)):  # jit and no-jit
            loss, m = f(*map(jnp.asarray, batch))
            chex.assert_shape(loss, (16,))
            np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-5, err_msg=f"{name} {kind}")
            np.testing.assert_allclose(m["rewards/chosen"], rw.mean(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(m["rewards/rejected"], rl.mean(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(m["rewards/margins"], (rw - rl).mean(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(m["rewards/accuracies"], (rw > rl).mean(), atol=1e-6)
            np.testing.assert_allclose(m["logps/chosen"], batch[0].mean(), rtol=1e-5)
            np.testing.assert_allclose(m["logps/rejected"], batch[1].mean(), rtol=1e-5)
        if kind == "equal" and name in ("dpo", "ln_dpo", "rpo"):
            np.testing.assert_allclose(loss - (want - np.log(2.0)), np.log(2.0), atol=1e-5)
            assert float(m["rewards/accuracies"]) == 0.0  # ties are not wins (as in TRL)


@pytest.mark.parametrize("name", pl.LOSSES)
def test_gradients_finite_for_extreme_inputs(name):
    n = 4
    pw = jnp.full((n,), -1e4)
    pl_ = jnp.array([-1e4, -1.0, -1e4, -1e-7])
    rw = jnp.array([-1.0, -1e4, -1e4, -1e4])
    rl = jnp.array([-1e4, -1e4, -1.0, -1e4])
    lens = jnp.array([1.0, 1.0, 7.0, 3.0])

    def total(pw, pl_):
        loss, _ = pl.preference_loss(name, pw, pl_, rw, rl, lens, lens, beta=0.1, **PARAMS)
        return jnp.sum(loss)

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(pw, pl_)
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))), (name, g)


def test_reference_free_losses_accept_none_and_others_refuse():
    pw, pl_, _, _, lw, ll = map(jnp.asarray, random_batch(np.random.default_rng(1)))
    for name in pl.REFERENCE_FREE:
        loss, _ = pl.preference_loss(name, pw, pl_, None, None, lw, ll, beta=2.0)
        assert np.all(np.isfinite(np.asarray(loss)))
    for name in set(pl.LOSSES) - set(pl.REFERENCE_FREE):
        with pytest.raises(ValueError, match=rf"preference loss '{name}' needs ref_chosen_logps, ref_rejected_logps"):
            pl.preference_loss(name, pw, pl_, None, None, lw, ll, beta=0.1)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        pl.preference_loss("simpo", pw, pl_, beta=2.0)


def test_bad_names_and_params_are_named():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"po.loss='kto' is not a known preference loss; allowed: \['dpo'"):
        pl.preference_loss("kto", x, x, x, x, beta=0.1)
    allowed = str(list(pl.LOSSES) + ["diffusion_dpo"]).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=r"config.dpo.method='kto' is not a known preference loss; allowed: " + allowed):
        pl.check_params("kto", 1.0, {}, section="config.dpo", loss_field="method")
    with pytest.raises(ValueError, match="config.dpo.snr_value must be > 0, got -1.0"):
        pl.check_params("mapo", 1.0, {"snr_value": -1.0}, section="config.dpo", loss_field="method")
    with pytest.raises(ValueError, match="po.beta must be > 0"):
        pl.preference_loss("dpo", x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match=r"unknown preference-loss parameter\(s\) \['lambda'\]"):
        pl.preference_loss("orpo", x, x, x, x, x + 1, x + 1, beta=0.1, **{"lambda": 0.1})
    with pytest.raises(ValueError, match="po.label_smoothing must be in"):
        pl.preference_loss("cdpo", x, x, x, x, beta=0.1, label_smoothing=0.5)


def test_sequence_logps_matches_a_loop_and_ignores_prompt_and_padding():
    rng = np.random.default_rng(3)
    b, t, v = 5, 9, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    tokens = rng.integers(0, v, (b, t))
    mask = np.zeros((b, t), np.float32)
    for i in range(b):  # prompt of 2-3 tokens, response of 1..rest, then padding
        start, stop = 2 + i % 2, min(t, 4 + i)
        mask[i, start:stop] = 1
    want = np.zeros(b)
    for i in range(b):
        for j in range(1, t):
            if mask[i, j]:
                lp = logits[i, j - 1] - np.log(np.sum(np.exp(logits[i, j - 1].astype(np.float64))))
                want[i] += lp[tokens[i, j]]
    for f in (pl.sequence_logps, jax.jit(pl.sequence_logps)):
        np.testing.assert_allclose(f(logits, tokens, mask), want, rtol=1e-5)
    # Changing a prompt or padded token (and the logits at padded positions) never changes the result.
    tokens2, logits2 = tokens.copy(), logits.copy()
    tokens2[mask == 0] = (tokens2[mask == 0] + 1) % v
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # last response position
    for i in range(b):
        logits2[i, last[i]:] = rng.normal(size=logits2[i, last[i]:].shape)
    np.testing.assert_allclose(pl.sequence_logps(logits2, tokens2, mask), want, rtol=1e-5)
    chex.assert_shape(pl.sequence_logps(logits, tokens, mask), (b,))


# ----------------------------------------------------------------------------------------------
# The diffusion losses through the registry (implicit log-likelihood -err/2, lengths 1)
# ----------------------------------------------------------------------------------------------
def random_errors(seed, n=64):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.0, 3.0, n).astype(np.float32) for _ in range(4)]


def through_registry(name, ew, el, rw=None, rl=None, **params):
    half = lambda e: None if e is None else -0.5 * jnp.asarray(e)
    ones = jnp.ones(len(ew))
    return pl.preference_loss(name, half(ew), half(el), half(rw), half(rl), ones, ones, **params)


@pytest.mark.parametrize("jit", [False, True])
def test_diffusion_dpo_through_the_registry_is_the_old_formula_exactly(jit):
    """Diffusion-DPO (arXiv 2311.12908 eq. 14, public code's scale): -log sigmoid(-(beta/2) [...])."""
    ew, el, rw, rl = random_errors(0)
    beta = 7.0
    old = lambda ew, el, rw, rl: -jax.nn.log_sigmoid(-0.5 * beta * ((ew - rw) - (el - rl)))  # the removed code
    new = lambda ew, el, rw, rl: through_registry("diffusion_dpo", ew, el, rw, rl, beta=beta)[0]
    if jit:
        old, new = jax.jit(old), jax.jit(new)
    np.testing.assert_array_equal(new(ew, el, rw, rl), old(ew, el, rw, rl))
    grad = lambda f: jax.grad(lambda e: jnp.sum(f(e, el, rw, rl)))(jnp.asarray(ew))
    np.testing.assert_array_equal(grad(new), grad(old))
    # ... and the formula in NumPy (float64); d loss / d err_w = (beta/2) sigmoid(-inside) > 0.
    x = (ew.astype(np.float64) - rw) - (el.astype(np.float64) - rl)
    np.testing.assert_allclose(new(ew, el, rw, rl), -np_logsig(-0.5 * beta * x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad(new), 0.5 * beta / (1 + np.exp(-0.5 * beta * x)), rtol=1e-4)
    _, m = through_registry("diffusion_dpo", ew, el, rw, rl, beta=beta)
    np.testing.assert_allclose(m["rewards/margins"], np.mean(-0.5 * beta * x), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(-0.5 * beta * x > 0))
    # policy == reference: log 2 whatever beta
    np.testing.assert_allclose(through_registry("dpo", ew, el, ew, el, beta=1000.0)[0], np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_mapo_through_the_registry_is_the_old_formula_exactly(jit):
    ew, el, _, _ = random_errors(2)
    beta, s, t = 0.3, 0.5, 1000.0

    def old(ew, el):  # the removed diffusion_preference.mapo
        margin = pl.odds_link(s * ew) - pl.odds_link(s * el)
        return ew - beta * jax.nn.log_sigmoid(t * margin)

    new = lambda ew, el: through_registry("mapo", ew, el, beta=beta, snr_value=s, margin_scale=t)[0]
    if jit:
        old, new = jax.jit(old), jax.jit(new)
    np.testing.assert_array_equal(new(ew, el), old(ew, el))
    m = np_mapo_link(s * ew.astype(np.float64)) - np_mapo_link(s * el.astype(np.float64))
    np.testing.assert_allclose(new(ew, el), ew - beta * np_logsig(t * m), rtol=1e-5, atol=1e-5)
    _, metrics = through_registry("mapo", ew, el, beta=beta)
    np.testing.assert_allclose(metrics["rewards/margins"], m.mean(), rtol=1e-4, atol=1e-7)


def test_odds_link_limits_and_finite_gradients():
    u = jnp.array([0.0, 1e-8, 1e-3, 1.0, 50.0, 1e4])
    np.testing.assert_allclose(pl.odds_link(u)[:2], [1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(pl.odds_link(u)[2:4], [1e-3 / np.expm1(1e-3), 1 / np.expm1(1.0)], rtol=1e-5)
    assert float(pl.odds_link(u)[-1]) == 0.0
    g = jax.vmap(jax.grad(pl.odds_link))(u)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[0], -0.5, atol=1e-6)  # h'(0) = -1/2
    gw = jax.grad(lambda e: jnp.sum(through_registry("mapo", e, jnp.flip(e), beta=0.1)[0]))(u)  # MaPO at 0 and 1e4
    assert np.all(np.isfinite(gw))


def test_every_loss_parameter_is_a_config_field_of_both_objectives():
    from fdistill import configs

    for family, section in (("po", "po"), ("diffusion_po", "dpo")):
        c = configs.base(family)[section]
        for name, p in pl.PARAMS.items():
            assert c[name] == p.default, (section, name)
