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
    # TRL 1.x DPOTrainer loss types, from the papers each cites (delta = pi - ref).
    dw, dl = pw - rw, pl_ - rl
    r = (beta * dw, beta * dl)
    if name == "robust":  # rDPO, 2403.00409 eq. 9
        return ((1 - ls) * -np_logsig(beta * h) - ls * -np_logsig(-beta * h)) / (1 - 2 * ls), *r
    if name == "exo_pair":  # EXO, 2402.00856 eq. 16: KL(q || p_label) over the two responses
        q = np.stack([1 / (1 + np.exp(-beta * h)), 1 / (1 + np.exp(beta * h))])
        p = np.array([1 - ls, ls])[:, None]
        return np.sum(q * np.log(q / p), axis=0), *r
    if name == "nca_pair":  # 2402.05369
        return -np_logsig(beta * dw) - 0.5 * np_logsig(-beta * dw) - 0.5 * np_logsig(-beta * dl), *r
    if name == "bco_pair":
        return -np_logsig(beta * dw) - np_logsig(-beta * dl), *r
    if name == "sppo_hard":  # 2405.00675 eq. 4.7 with P(y_w wins) = 1
        return (dw - 1 / (2 * beta)) ** 2 + (dl + 1 / (2 * beta)) ** 2, *r
    if name in ("aot", "aot_unpaired"):  # 2406.05882: order statistics of the batch
        d = (np.sort(pw - pl_) - np.sort(rw - rl)) if name == "aot" else (np.sort(dw) - np.sort(dl))
        return -(1 - ls) * np_logsig(beta * d) - ls * np_logsig(-beta * d), *r
    sig = lambda x: np.exp(np_logsig(x))
    if name == "apo_zero":  # 2408.06266 eq. 7
        return 1 - sig(beta * dw) + sig(beta * dl), *r
    if name == "apo_down":  # eq. 8
        return sig(beta * dw) + 1 - sig(beta * h), *r
    if name == "discopop":  # 2406.08414 eq. 5, tau 0.05
        m = sig(beta * h / 0.05)
        with np.errstate(over="ignore"):
            expo = np.where(m > 0, np.exp(-beta * h), 0.0)
        return (1 - m) * -np_logsig(beta * h) + m * expo, *r
    if name == "cpo":  # 2401.08417 eq. 6: sigmoid on summed log-probs + alpha NLL per token
        return -np_logsig(beta * (pw - pl_)) + alpha * (-pw / lw), beta * pw, beta * pl_
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


PARAMS = dict(label_smoothing=0.1, gamma=0.5, alpha=1.0, lambda_=0.1, snr_value=0.5, margin_scale=1000.0,
              discopop_tau=0.05, cpo_alpha=1.0)


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
    # One config field, ranges per loss: eps = 0 is plain DPO for cdpo, log 0 for exo_pair.
    pl.preference_loss("cdpo", x, x, x, x, beta=0.1, label_smoothing=0.0)
    with pytest.raises(ValueError, match=r"po.label_smoothing must be in \(0, 0.5\) .*got 0.0 \(po.loss='exo_pair'\)"):
        pl.preference_loss("exo_pair", x, x, x, x, beta=0.1, label_smoothing=0.0)
    with pytest.raises(ValueError, match=r"po.nll_norm must be 'example' or 'batch', got 'token'"):
        pl.preference_loss("rpo", x, x, x, x, x + 1, beta=0.1, nll_norm="token")


def test_order_statistic_losses_couple_the_batch():
    """aot / aot_unpaired compare sorted margins: permuting the pairs permutes nothing in the loss
    vector (it is indexed by rank), and changing one pair can change every rank's loss."""
    rng = np.random.default_rng(5)
    batch = list(map(jnp.asarray, random_batch(rng)))
    perm = rng.permutation(16)
    for name in ("aot", "aot_unpaired"):
        loss, _ = pl.preference_loss(name, *batch, beta=0.7)
        shuffled, _ = pl.preference_loss(name, *[b[perm] for b in batch], beta=0.7)
        np.testing.assert_allclose(shuffled, loss, rtol=1e-6)
        changed = [b.at[0].add(-50.0) if i == 0 else b for i, b in enumerate(batch)]
        assert np.sum(np.asarray(pl.preference_loss(name, *changed, beta=0.7)[0]) != np.asarray(loss)) > 1


def test_nll_normalisation_example_and_batch():
    """'example': -pi_w / |y_w| per pair (RPO/ORPO papers); 'batch': TRL's -sum pi_w / sum |y_w| for
    every pair. Equal lengths make them the same mean; unequal lengths differ (parity.md: 1.541 vs 2.210)."""
    pw, pl_, rw, rl, lw, ll = random_batch(np.random.default_rng(6))
    args = list(map(jnp.asarray, (pw, pl_, rw, rl, lw, ll)))
    token_mean = -pw.astype(np.float64).sum() / lw.sum()
    for name in ("rpo", "orpo", "cpo"):
        ex, m_ex = pl.preference_loss(name, *args, beta=0.7, nll_norm="example")
        ba, m_ba = pl.preference_loss(name, *args, beta=0.7, nll_norm="batch")
        np.testing.assert_allclose(m_ex["nll"], np.mean(-pw / lw), rtol=1e-5)
        np.testing.assert_allclose(m_ba["nll"], token_mean, rtol=1e-5)
        np.testing.assert_allclose(ba - ex, token_mean - (-pw / lw), rtol=1e-4, atol=1e-4)  # NLL weight 1
        same = [a if i != 4 else jnp.full_like(a, 7.0) for i, a in enumerate(args)]
        e2 = pl.preference_loss(name, *same, beta=0.7, nll_norm="example")[0]
        b2 = pl.preference_loss(name, *same, beta=0.7, nll_norm="batch")[0]
        np.testing.assert_allclose(jnp.mean(e2), jnp.mean(b2), rtol=1e-5)


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


def test_kto_loss_matches_numpy_and_holds_the_reference_point_constant():
    """KTO (arXiv 2402.01306 eqs. 7-8): z_ref = max(0, mean(pi_kl - ref_kl)) is a constant of the
    gradient; desirable examples pay lambda_D (1 - s(b (r - z))), undesirable lambda_U (1 - s(b (z - r)))."""
    rng = np.random.default_rng(7)
    n, beta, lam_d, lam_u = 12, 0.3, 1.5, 0.7
    pi, ref, pi_kl, ref_kl = (-rng.uniform(1, 10, n).astype(np.float32) for _ in range(4))
    d = (rng.random(n) < 0.4).astype(np.float32)
    for shift in (0.0, 3.0, -3.0):  # KL estimate negative (clamped to 0) and positive
        kl_in = pi_kl + shift
        z = max(0.0, float(np.mean(kl_in.astype(np.float64) - ref_kl)))
        r = pi.astype(np.float64) - ref
        sig = lambda x: 1 / (1 + np.exp(-x))
        want = np.where(d > 0, lam_d * (1 - sig(beta * (r - z))), lam_u * (1 - sig(beta * (z - r))))
        loss, m = pl.kto_loss(pi, ref, d, kl_in, ref_kl, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["kl"], z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["rewards/chosen"], beta * r[d > 0].mean(), rtol=1e-5)
        np.testing.assert_allclose(m["rewards/rejected"], beta * r[d == 0].mean(), rtol=1e-5)
        np.testing.assert_allclose(m["logps/chosen"], pi[d > 0].mean(), rtol=1e-5)
    grad_kl = jax.grad(lambda k: jnp.sum(pl.kto_loss(pi, ref, d, k, ref_kl, beta=beta)[0]))(jnp.asarray(pi_kl + 3.0))
    np.testing.assert_array_equal(grad_kl, 0.0)
    # policy == reference and z = 0: every example pays lambda / 2
    loss, _ = pl.kto_loss(pi, pi, d, pi_kl, pi_kl, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    np.testing.assert_allclose(loss, np.where(d > 0, lam_d, lam_u) / 2, rtol=1e-6)
