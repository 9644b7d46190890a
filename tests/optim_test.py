"""Optimizer: LR schedules, the weight-decay mask, gradient accumulation and clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from configs import common

LR, MIN_RATIO = 1e-3, 0.1


def ocfg(**overrides):
    o = common.base().optim
    o.lr, o.min_lr_ratio = LR, MIN_RATIO
    for k, v in overrides.items():
        o[k] = v
    return o


def lr_at(schedule, step):
    return float(schedule(step))


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_warmup(name):
    s = optim.make_schedule(ocfg(schedule=name, warmup_steps=10), 100)
    assert lr_at(s, 0) == 0.0
    np.testing.assert_allclose(lr_at(s, 5), LR / 2, rtol=1e-5)
    np.testing.assert_allclose(lr_at(s, 10), LR, rtol=1e-5)
    values = [lr_at(s, i) for i in range(11)]
    assert values == sorted(values)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_decay_ends_at_min_lr(name, warmup):
    s = optim.make_schedule(ocfg(schedule=name, warmup_steps=warmup), 100)
    np.testing.assert_allclose(lr_at(s, 100), LR * MIN_RATIO, rtol=1e-5)
    after = [lr_at(s, i) for i in range(warmup, 101)]
    assert all(a >= b - 1e-9 for a, b in zip(after, after[1:]))  # non-increasing after warmup
    assert after[0] == pytest.approx(LR, rel=1e-5)
    if name != "wsd":
        assert LR * MIN_RATIO < lr_at(s, 55) < LR


def test_cosine_midpoint():
    s = optim.make_schedule(ocfg(schedule="cosine", warmup_steps=10), 110)
    np.testing.assert_allclose(lr_at(s, 60), LR * (MIN_RATIO + 1) / 2, rtol=1e-5)


def test_linear_midpoint():
    s = optim.make_schedule(ocfg(schedule="linear", warmup_steps=10), 110)
    np.testing.assert_allclose(lr_at(s, 60), LR * (MIN_RATIO + 1) / 2, rtol=1e-5)


def test_constant_holds():
    s = optim.make_schedule(ocfg(schedule="constant", warmup_steps=10), 100)
    for step in (10, 50, 100, 1000):
        np.testing.assert_allclose(lr_at(s, step), LR, rtol=1e-6)


def test_wsd_holds_then_decays():
    # 10 warmup + 90 post-warmup steps, the last 20% (18 steps) decaying: decay starts at step 82
    s = optim.make_schedule(ocfg(schedule="wsd", warmup_steps=10, wsd_decay_fraction=0.2), 100)
    for step in range(10, 83):
        np.testing.assert_allclose(lr_at(s, step), LR, rtol=1e-6, err_msg=f"step {step}")
    assert lr_at(s, 83) < LR
    np.testing.assert_allclose(lr_at(s, 91), LR * (1 + MIN_RATIO) / 2, rtol=1e-5)
    np.testing.assert_allclose(lr_at(s, 100), LR * MIN_RATIO, rtol=1e-5)


def test_schedule_errors():
    with pytest.raises(ValueError, match="inverse_sqrt"):
        optim.make_schedule(ocfg(schedule="inverse_sqrt"), 100)
    for warmup in (100, 150):
        with pytest.raises(ValueError, match="warmup_steps"):
            optim.make_schedule(ocfg(schedule="cosine", warmup_steps=warmup), 100)


# ---------------------------------------------------------------- decay mask

def _params():
    return {
        "embed": {"embedding": jnp.ones((5, 4))},
        "layer": {"attn_norm": {"scale": jnp.ones((4,))},
                  "mlp": {"up": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))}}},
    }


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask(decay_embeddings):
    mask = optim.decay_mask(_params(), decay_embeddings)
    assert mask == {
        "embed": {"embedding": decay_embeddings},
        "layer": {"attn_norm": {"scale": False}, "mlp": {"up": {"kernel": True, "bias": False}}},
    }


def test_weight_decay_only_touches_masked_leaves():
    o = ocfg(schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    tx, _ = optim.make_optimizer(o, 10)
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["layer"]["mlp"]["up"]["kernel"]).min()) > 0
    for leaf in (updates["embed"]["embedding"], updates["layer"]["mlp"]["up"]["bias"],
                 updates["layer"]["attn_norm"]["scale"]):
        assert not jnp.any(leaf)


# ---------------------------------------------------------------- make_optimizer

def _grads(seed, scale=1.0):
    leaves, treedef = jax.tree.flatten(_params())
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _apply(tx, params, grads_seq):
    """Run the optimizer over a gradient sequence; return the params after every call."""
    state, history, update = tx.init(params), [], jax.jit(tx.update)
    for g in grads_seq:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


def _assert_trees_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_grad_accumulation_matches_mean_gradient(clip_norm):
    kw = dict(schedule="cosine", warmup_steps=1, clip_norm=clip_norm, weight_decay=0.1)
    tx4, _ = optim.make_optimizer(ocfg(grad_accum_steps=4, **kw), 10)
    tx1, _ = optim.make_optimizer(ocfg(grad_accum_steps=1, **kw), 10)
    params = _params()
    micro = [[_grads(10 * step + i) for i in range(4)] for step in range(3)]
    accum = _apply(tx4, params, [g for step in micro for g in step])
    mean = [jax.tree.map(lambda *gs: sum(gs) / 4, *step) for step in micro]
    single = _apply(tx1, params, mean)
    for step in range(3):
        before = params if step == 0 else single[step - 1]
        for i in range(3):  # no update until the 4th micro-batch
            _assert_trees_close(accum[4 * step + i], before, atol=0)
        _assert_trees_close(accum[4 * step + 3], single[step])
    # the second update (warmup done) really moved the params
    kernel = lambda p: p["layer"]["mlp"]["up"]["kernel"]
    assert float(jnp.abs(kernel(single[1]) - kernel(single[0])).max()) > 1e-4


def test_grad_accum_steps_must_be_positive():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        optim.make_optimizer(ocfg(grad_accum_steps=0, warmup_steps=1), 10)


def test_clip_norm_limits_huge_gradients():
    # Adam is (nearly) scale invariant on one step, so clipping shows in the following steps:
    # a huge first gradient must leave the same moments as that gradient scaled to norm clip_norm.
    kw = dict(schedule="constant", warmup_steps=0, weight_decay=0.0)
    g0, small = _grads(0), [_grads(s, scale=0.01) for s in (1, 2)]
    huge = jax.tree.map(lambda x: 1e6 * x, g0)
    at_clip = jax.tree.map(lambda x: 0.5 * x / optax.tree.norm(g0), g0)  # norm 0.5 = clip_norm
    tx, _ = optim.make_optimizer(ocfg(clip_norm=0.5, **kw), 10)
    _assert_trees_close(_apply(tx, _params(), [huge] + small), _apply(tx, _params(), [at_clip] + small))
    tx_off, _ = optim.make_optimizer(ocfg(clip_norm=0.0, **kw), 10)
    off = _apply(tx_off, _params(), [huge] + small)[-1]
    on = _apply(tx, _params(), [huge] + small)[-1]
    diff = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), off, on)
    assert max(float(d) for d in jax.tree.leaves(diff)) > 1e-4
