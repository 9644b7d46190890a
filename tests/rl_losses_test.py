"""rl/losses.py against closed forms, hand-computed numbers and plain numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import losses

EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric (DAPO clip-higher)


def logp_for_ratio(r: float) -> np.float32:
    """A float32 log-ratio d with jnp.exp(d) == float32(r) exactly (searching the ulps near log r),
    so the tests can put a ratio exactly on a clip bound."""
    target = np.float32(r)
    cand = np.float32(math.log(r)) + np.arange(-64, 65, dtype=np.float32) * np.spacing(np.float32(math.log(r)))
    hits = cand[np.asarray(jnp.exp(jnp.asarray(cand))) == target]
    assert hits.size, f"no float32 log-ratio gives exactly {r}"
    return hits[0]


RATIOS = (0.5, 0.79, 1 - EPS_LOW, 0.9, 1.0, 1.25, 1 + EPS_HIGH, 1.3, 2.0)


@pytest.mark.parametrize("adv", [1.5, -1.5])
def test_clipped_surrogate_bounds_and_gradient(adv):
    logp = np.array([[logp_for_ratio(r) for r in RATIOS]], np.float32)
    old = np.zeros_like(logp)
    ratio = np.asarray(jnp.exp(jnp.asarray(logp) - old))[0]
    assert ratio[2] == np.float32(1 - EPS_LOW) and ratio[6] == np.float32(1 + EPS_HIGH) and ratio[4] == 1.0
    a = np.full_like(logp, adv)
    loss, low, high = losses.clipped_surrogate(logp, old, a, EPS_LOW, EPS_HIGH)
    # Clipped only strictly outside the bound on the side the advantage pushes towards; 1.25 is inside
    # [0.8, 1.28] (it would be clipped by a symmetric 0.2) and 0.79 just outside.
    want_high = [0, 0, 0, 0, 0, 0, 0, 1, 1] if adv > 0 else [0] * 9
    want_low = [1, 1, 0, 0, 0, 0, 0, 0, 0] if adv < 0 else [0] * 9
    np.testing.assert_array_equal(high[0], want_high)
    np.testing.assert_array_equal(low[0], want_low)
    r64 = ratio.astype(np.float64)
    want = -np.minimum(r64 * adv, np.clip(r64, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    np.testing.assert_allclose(loss[0], want, rtol=1e-6)
    # d loss / d logp = -A * ratio where unclipped (a ratio exactly on a bound included), 0 where clipped
    grad = jax.grad(lambda lp: jnp.sum(losses.clipped_surrogate(lp, old, a, EPS_LOW, EPS_HIGH)[0]))(logp)
    clipped = np.array(want_high) + np.array(want_low)
    np.testing.assert_allclose(grad[0], np.where(clipped, 0.0, -adv * r64), rtol=1e-6)
    # nothing reaches old_logp or the advantages
    g_old, g_adv = jax.grad(lambda o, b: jnp.sum(losses.clipped_surrogate(logp, o, b, EPS_LOW, EPS_HIGH)[0]),
                            argnums=(0, 1))(old, a)
    assert not np.any(g_old) and not np.any(g_adv)


def test_dual_clip():
    logp = np.log(np.array([[5.0, 2.0, 5.0, 0.5]], np.float32))
    old = np.zeros_like(logp)
    adv = np.array([[-1.0, -1.0, 1.0, -1.0]], np.float32)
    plain, _, _ = losses.clipped_surrogate(logp, old, adv, EPS_LOW, EPS_HIGH)
    np.testing.assert_allclose(plain[0], [5.0, 2.0, -1.28, 0.8], rtol=1e-6)
    f = jax.jit(losses.clipped_surrogate, static_argnums=(3, 4, 5))
    dual, _, _ = f(logp, old, adv, EPS_LOW, EPS_HIGH, 3.0)
    np.testing.assert_allclose(dual[0], [3.0, 2.0, -1.28, 0.8], rtol=1e-6)  # only A < 0 with a huge ratio is capped
    grad = jax.grad(lambda lp: jnp.sum(losses.clipped_surrogate(lp, old, adv, EPS_LOW, EPS_HIGH, 3.0)[0]))(logp)
    np.testing.assert_allclose(grad[0], [0.0, 2.0, 0.0, 0.0], rtol=1e-6)
    for bad in (0.5, 1.0, -2.0):
        with pytest.raises(ValueError, match=f"dual_clip={bad}"):
            losses.clipped_surrogate(logp, old, adv, EPS_LOW, EPS_HIGH, dual_clip=bad)


def test_value_loss():
    v = np.array([[1.0, 1.0, 0.3]], np.float32)
    old = np.zeros_like(v)
    ret = np.array([[2.0, 0.0, 1.0]], np.float32)
    # clip 0.5: v_clipped = [0.5, 0.5, 0.3]; max((v-R)^2, (v_clipped-R)^2) = [max(1, 2.25), max(1, .25), .49]
    np.testing.assert_allclose(losses.value_loss(v, old, ret, 0.5)[0], [1.125, 0.5, 0.245], rtol=1e-6)
    np.testing.assert_allclose(losses.value_loss(v, old, ret, 0.0)[0], [0.5, 0.5, 0.245], rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(losses.value_loss(x, old, ret, 0.5)))(v)
    np.testing.assert_allclose(g[0], [0.0, 1.0, -0.7], rtol=1e-6)  # clipped branch wins in column 0: no gradient


def test_aggregations():
    loss = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [np.inf, np.nan, 0, 0], [2, 4, 6, 8]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    # row sums [6, 5, -, 20], lengths [3, 1, 0, 4], row means [2, 5, -, 5]; the empty row is left out
    assert float(losses.aggregate(loss, mask, "sequence_mean")) == pytest.approx(4.0)
    assert float(losses.aggregate(loss, mask, "token_mean")) == pytest.approx(31 / 8)
    assert float(losses.aggregate(loss, mask, "constant_norm", max_len=5)) == pytest.approx(31 / 20)
    assert float(losses.aggregate(loss, mask.astype(bool), "token_mean")) == pytest.approx(31 / 8)
    assert float(losses.masked_mean(loss, mask)) == pytest.approx(31 / 8)
    jitted = jax.jit(losses.aggregate, static_argnames=("how", "max_len"))
    assert float(jitted(loss, mask, how="constant_norm", max_len=5)) == pytest.approx(31 / 20)
    empty = np.zeros_like(mask)
    for how in ("sequence_mean", "token_mean"):
        assert float(losses.aggregate(loss, empty, how)) == 0.0
    for bad in (None, 0):
        with pytest.raises(ValueError, match=f"max_len={bad}"):
            losses.aggregate(loss, mask, "constant_norm", max_len=bad)
    with pytest.raises(ValueError, match="'mean'.*sequence_mean"):
        losses.aggregate(loss, mask, "mean")


def test_entropy():
    np.testing.assert_allclose(losses.entropy(jnp.zeros((2, 3, 7), jnp.bfloat16)), np.full((2, 3), math.log(7)),
                               rtol=1e-6)
    one_hot = np.full((1, 1, 5), -np.inf, np.float32)
    one_hot[..., 2] = 0.0
    assert float(losses.entropy(one_hot)[0, 0]) == 0.0
    logits = np.random.default_rng(0).normal(size=(2, 3, 11))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(losses.entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)


P = np.array([0.1, 0.2, 0.3, 0.4])
Q = np.array([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("kind", losses.KL_ESTIMATORS)
def test_kl_estimators(kind):
    kl = float(np.sum(P * np.log(P / Q)))
    # exact expectation under p over the 4 outcomes: k1 and k3 are unbiased
    per_outcome = np.asarray(losses.kl_estimate(np.log(P)[None], np.log(Q)[None], kind))[0]
    if kind != "k2":
        assert float(np.sum(P * per_outcome)) == pytest.approx(kl, rel=1e-5)
    # sample average over draws from p
    x = np.random.default_rng(0).choice(4, size=(1, 200_000), p=P)
    k = np.asarray(losses.kl_estimate(np.log(P)[x], np.log(Q)[x], kind))
    if kind != "k2":
        assert abs(k.mean() - kl) < 5 * k.std() / math.sqrt(k.size)
    if kind != "k1":
        assert np.all(k >= 0)
        grid = np.linspace(-20, 20, 4001, dtype=np.float32)[None]  # any log-ratio, 0 included
        assert np.all(np.asarray(losses.kl_estimate(np.zeros_like(grid), grid, kind)) >= 0)
    with pytest.raises(ValueError, match="'k4'"):
        losses.kl_estimate(np.log(P)[x], np.log(Q)[x], "k4")


def softplus(z):
    return math.log1p(math.exp(z))


# policy chosen/rejected, reference chosen/rejected: h = (-10 + 11) - (-12 + 11.5) = 1.5
PC, PR, RC, RR = (np.array([v], np.float32) for v in (-10.0, -12.0, -11.0, -11.5))


def test_dpo_sigmoid_smoothing_and_robust():
    z = 0.1 * 1.5
    assert float(losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1)[0]) == pytest.approx(softplus(-z), rel=1e-6)
    same = losses.preference_loss("sigmoid", PC, PR, PC, PR, beta=0.5)
    assert float(same[0]) == pytest.approx(math.log(2), rel=1e-6)
    cdpo = losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert float(cdpo[0]) == pytest.approx(0.9 * softplus(-z) + 0.1 * softplus(z), rel=1e-6)
    robust = losses.preference_loss("robust", PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert float(robust[0]) == pytest.approx((0.9 * softplus(-z) - 0.1 * softplus(z)) / 0.8, rel=1e-5)
    plain = losses.preference_loss("robust", PC, PR, RC, RR, beta=0.1)
    assert float(plain[0]) == pytest.approx(softplus(-z), rel=1e-6)


def test_ipo_and_simpo():
    ipo = losses.preference_loss("ipo", PC, PR, RC, RR, beta=0.1)
    assert float(ipo[0]) == pytest.approx((1.5 - 5.0) ** 2, rel=1e-6)
    avg_c, avg_r = np.array([-1.2], np.float32), np.array([-1.5], np.float32)
    simpo = losses.preference_loss("simpo", avg_c, avg_r, None, None, beta=2.0, simpo_gamma=0.5)
    assert float(simpo[0]) == pytest.approx(softplus(-(2.0 * 0.3 - 0.5)), rel=1e-5)


def test_preference_validation():
    with pytest.raises(ValueError, match="beta=0"):
        losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0)
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        losses.preference_loss("robust", PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing=-0.1"):
        losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="'kto'"):
        losses.preference_loss("kto", PC, PR, RC, RR, beta=0.1)
    with pytest.raises(ValueError, match="None"):
        losses.preference_loss("sigmoid", PC, PR, None, None, beta=0.1)


def test_bradley_terry():
    rc, rr = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    margin = np.array([0.5, 0.0], np.float32)
    np.testing.assert_allclose(losses.bradley_terry_loss(rc, rr, margin), [softplus(-0.5), softplus(1.0)], rtol=1e-6)
    np.testing.assert_allclose(losses.bradley_terry_loss(rc, rr), [softplus(-1.0), softplus(1.0)], rtol=1e-6)
    g_c, g_r = jax.grad(lambda c, r: jnp.sum(losses.bradley_terry_loss(c, r, margin)), argnums=(0, 1))(rc, rr)
    assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)
