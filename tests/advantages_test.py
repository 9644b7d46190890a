"""rl/advantages.py against hand-computed numbers and plain numpy/python-loop references."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rl import advantages


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference GAE: a python loop over each row's real (right-padded) tokens."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


# Row 0 has 3 real tokens (the padding holds junk that must not leak in), row 1 has 4.
REWARDS = np.array([[0.0, 0.0, 1.0, 9.0], [0.1, 0.0, 0.0, 2.0]], np.float32)
VALUES = np.array([[0.5, 0.4, 0.3, 7.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)


def test_gae_hand_computed():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), worked by hand:
    # row 0: deltas = [0.9*0.4 - 0.5, 0.9*0.3 - 0.4, 1 - 0.3] = [-0.14, -0.13, 0.7]
    #        A2 = 0.7, A1 = -0.13 + 0.72*0.7 = 0.374, A0 = -0.14 + 0.72*0.374 = 0.12928
    # row 1: deltas = [0.1 + 0.9*2 - 1, 0.9*3 - 2, 0.9*4 - 3, 2 - 4] = [0.9, 0.7, 0.6, -2]
    #        A3 = -2, A2 = 0.6 - 1.44 = -0.84, A1 = 0.7 - 0.6048 = 0.0952, A0 = 0.9 + 0.068544
    adv, ret = advantages.gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv, [[0.12928, 0.374, 0.7, 0.0], [0.968544, 0.0952, -0.84, -2.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.62928, 0.774, 1.0, 0.0], [1.968544, 2.0952, 2.16, 2.0]], atol=1e-6)
    assert adv.dtype == ret.dtype == np.float32


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    adv, ret = advantages.gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    to_go = np.cumsum((REWARDS * MASK)[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(adv, (to_go - VALUES) * MASK, atol=1e-6)
    np.testing.assert_allclose(ret, to_go * MASK, atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.5, 0.0), (1.0, 0.9)])
def test_gae_matches_loop_under_jit(gamma, lam):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 9)).astype(np.float32)
    values = rng.normal(size=(5, 9)).astype(np.float32)
    lengths = np.array([9, 4, 1, 0, 6])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.float32)
    adv, ret = jax.jit(advantages.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
    assert not np.any(np.asarray(adv)[mask == 0]) and not np.any(np.asarray(ret)[mask == 0])


def test_whiten():
    rng = np.random.default_rng(1)
    x = (3.0 + 2.0 * rng.normal(size=(4, 10))).astype(np.float32)
    mask = (np.arange(10)[None, :] < np.array([10, 7, 3, 0])[:, None])
    x[~mask] = 1e6  # junk on padding must not move the statistics
    out = np.asarray(advantages.whiten(x, mask))
    real = out[mask]
    assert abs(real.mean()) < 1e-5 and abs(real.var() - 1.0) < 1e-4
    assert not np.any(out[~mask])
    kept = np.asarray(advantages.whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask].mean(), x[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(kept[mask].var(), 1.0, rtol=1e-4)
    assert not np.any(kept[~mask])


REWARDS_B = np.array([1.0, 3.0, 5.0, 5.0, 0.0, 4.0], np.float32)  # 3 groups of 2


def test_group_advantages_group_batch_none():
    e = 1e-4
    # group means [2, 5, 2], population stds [1, 0, 2]; deviations [-1, 1, 0, 0, -2, 2]
    np.testing.assert_allclose(advantages.group_advantages(REWARDS_B, 2, scale="none"), [-1, 1, 0, 0, -2, 2])
    np.testing.assert_allclose(advantages.group_advantages(REWARDS_B, 2, scale="group"),
                               [-1 / (1 + e), 1 / (1 + e), 0, 0, -2 / (2 + e), 2 / (2 + e)], rtol=1e-6)
    # batch: mean 3, squared deviations [4, 0, 4, 4, 9, 1] -> variance 22 / 6
    std = np.sqrt(22 / 6)
    np.testing.assert_allclose(advantages.group_advantages(REWARDS_B, 2, scale="batch"),
                               np.array([-1, 1, 0, 0, -2, 2]) / (std + e), rtol=1e-6)
    assert advantages.group_advantages(REWARDS_B.astype(np.int32), 2).dtype == np.float32


def test_group_advantages_rloo():
    # G = 2: leave-one-out mean is the other reward
    np.testing.assert_allclose(advantages.group_advantages(REWARDS_B, 2, scale="none", baseline="rloo"),
                               [-2, 2, 0, 0, -4, 4])
    # G = 4, rewards [4, 0, 2, 2]: others' means [4/3, 8/3, 2, 2]
    np.testing.assert_allclose(advantages.group_advantages([4.0, 0.0, 2.0, 2.0], 4, scale="none", baseline="rloo"),
                               [8 / 3, -8 / 3, 0, 0], rtol=1e-6)


def test_zero_variance_groups():
    assert float(advantages.zero_variance_groups(REWARDS_B, 2)) == pytest.approx(1 / 3)
    assert float(advantages.zero_variance_groups(REWARDS_B, 6)) == 0.0
    assert float(advantages.zero_variance_groups([1.0, 1.0, 0.0, 0.0], 2)) == 1.0


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="6.*group_size=4"):
        advantages.group_advantages(REWARDS_B, 4)
    with pytest.raises(ValueError, match="6.*group_size=4"):
        advantages.zero_variance_groups(REWARDS_B, 4)
    with pytest.raises(ValueError, match="'std'"):
        advantages.group_advantages(REWARDS_B, 2, scale="std")
    with pytest.raises(ValueError, match="'median'"):
        advantages.group_advantages(REWARDS_B, 2, baseline="median")
    with pytest.raises(ValueError, match="group_size=1"):
        advantages.group_advantages(REWARDS_B, 1, baseline="rloo")
