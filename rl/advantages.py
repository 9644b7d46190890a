"""Advantage estimators as pure jax.numpy functions: GAE for PPO, group-relative for GRPO/RLOO.

Per-token tensors are [B, T] over completion tokens; `mask_BxT` (float or bool) is 1 on real
tokens. Math is float32 whatever the input dtype; string options and sizes are Python values
(static under jit). Outputs are rollout targets: no gradient flows through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALE_REWARDS = ("group", "batch", "none")
BASELINES = ("mean", "rloo")


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def gae(rewards_BxT, values_BxT, mask_BxT, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation") over each row's completion tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t            (returns, the value targets)

    V_{t+1} is values[t + 1] when t + 1 is a real token of the row, else 0: the episode ends after
    its last real token (no bootstrap). Rows are right-padded (1s then 0s); A and R are 0 on
    padding. A reverse-time jax.lax.scan, so it runs under jit for any T.
    Returns (advantages_BxT, returns_BxT).
    """
    mask_BxT = _f32(mask_BxT)
    rewards_BxT = jnp.where(mask_BxT > 0, _f32(rewards_BxT), 0.0)
    values_BxT = jnp.where(mask_BxT > 0, _f32(values_BxT), 0.0)
    zeros_Bx1 = jnp.zeros_like(values_BxT[:, :1])
    next_values_BxT = jnp.concatenate([values_BxT[:, 1:], zeros_Bx1], axis=1)
    deltas_BxT = rewards_BxT + gamma * next_values_BxT - values_BxT

    def step(next_adv_B, xs):
        delta_B, m_B = xs
        adv_B = m_B * (delta_B + gamma * lam * next_adv_B)
        return adv_B, adv_B

    _, adv_TxB = jax.lax.scan(step, jnp.zeros_like(deltas_BxT[:, 0]), (deltas_BxT.T, mask_BxT.T), reverse=True)
    advantages_BxT = adv_TxB.T
    returns_BxT = (advantages_BxT + values_BxT) * mask_BxT
    return jax.lax.stop_gradient(advantages_BxT), jax.lax.stop_gradient(returns_BxT)


def whiten(x_BxT, mask_BxT, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) with the mean and the (population, ddof=0) variance over the
    masked entries; the mean is added back when not shift_mean. 0 on padding."""
    mask_BxT = _f32(mask_BxT)
    x_BxT = jnp.where(mask_BxT > 0, _f32(x_BxT), 0.0)
    count = jnp.maximum(jnp.sum(mask_BxT), 1.0)
    mean = jnp.sum(x_BxT * mask_BxT) / count
    var = jnp.sum(jnp.square(x_BxT - mean) * mask_BxT) / count
    out_BxT = (x_BxT - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out_BxT = out_BxT + mean
    return jnp.where(mask_BxT > 0, out_BxT, 0.0)


def _groups(rewards_B, group_size: int):
    """rewards [B] -> [B // G, G] for consecutive groups of G, or ValueError naming both."""
    rewards_B = _f32(rewards_B)
    if rewards_B.ndim != 1:
        raise ValueError(f"rewards must be rank 1 [B], got shape {rewards_B.shape}")
    b = rewards_B.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"batch of {b} rewards is not divisible into groups of group_size={group_size}")
    return rewards_B.reshape(b // group_size, group_size)


def group_advantages(rewards_B, group_size: int, scale: str = "group", baseline: str = "mean", eps: float = 1e-4):
    """Group-relative advantages [B] for G = group_size completions per prompt, stored as
    consecutive rows (rows i*G .. i*G + G - 1 answer prompt i):

        baseline "mean"  GRPO (Shao et al. 2024, DeepSeekMath): r_i - mean_j r_j over the group.
        baseline "rloo"  REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024):
                         r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean); needs G >= 2.
        scale "group"    divide by the group's std + eps (GRPO).
        scale "batch"    divide by the std of all B rewards + eps (Liu et al. 2025 suggest it).
        scale "none"     no division (Dr. GRPO, Liu et al. 2025; RLOO).

    std is the population std (ddof=0); TRL and verl use the Bessel-corrected one, which for a
    fixed G only rescales every advantage by about sqrt(G / (G - 1)).
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"reward scale={scale!r}: expected one of {SCALE_REWARDS}")
    if baseline not in BASELINES:
        raise ValueError(f"advantage baseline={baseline!r}: expected one of {BASELINES}")
    if baseline == "rloo" and group_size < 2:
        raise ValueError(f"baseline 'rloo' needs group_size >= 2, got group_size={group_size}")
    r_NxG = _groups(rewards_B, group_size)
    mean_Nx1 = jnp.mean(r_NxG, axis=1, keepdims=True)
    if baseline == "mean":
        adv_NxG = r_NxG - mean_Nx1
    else:
        adv_NxG = r_NxG - (jnp.sum(r_NxG, axis=1, keepdims=True) - r_NxG) / (group_size - 1)
    if scale == "group":
        adv_NxG = adv_NxG / (jnp.std(r_NxG, axis=1, keepdims=True) + eps)
    elif scale == "batch":
        adv_NxG = adv_NxG / (jnp.std(r_NxG) + eps)
    return jax.lax.stop_gradient(adv_NxG.reshape(-1))


def zero_variance_groups(rewards_B, group_size: int):
    """Fraction (float32 scalar) of the groups whose rewards are all equal: under a group baseline
    their advantages are all 0, so they give no learning signal (DAPO's dynamic sampling drops them)."""
    r_NxG = _groups(rewards_B, group_size)
    same_N = jnp.max(r_NxG, axis=1) == jnp.min(r_NxG, axis=1)
    return jnp.mean(same_N.astype(jnp.float32))
