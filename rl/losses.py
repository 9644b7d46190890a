"""RL and preference losses as pure jax.numpy functions of per-token / per-sequence log-probs.

Per-token tensors are [B, T] over completion tokens; `mask_BxT` (float or bool) is 1 on real
tokens. Everything is computed in float32 whatever the input dtype. String arguments (`kind`,
`how`) and hyper-parameters are Python values: static under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant_norm")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "robust", "simpo")


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def kl_estimate(logp_BxT, ref_logp_BxT, kind: str):
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (J. Schulman, "Approximating
    KL divergence", 2020). With log_ratio r = ref_logp - logp:

        k1 = -r                 unbiased, can be negative, high variance
        k2 = r**2 / 2           biased (low for small KL), >= 0
        k3 = exp(r) - 1 - r     unbiased, >= 0, low variance (GRPO's KL penalty)

    No gradient flows into `ref_logp` (the reference model is frozen).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator kind={kind!r}: expected one of {KL_ESTIMATORS}")
    log_ratio_BxT = jax.lax.stop_gradient(_f32(ref_logp_BxT)) - _f32(logp_BxT)
    if kind == "k1":
        return -log_ratio_BxT
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio_BxT)
    return jnp.expm1(log_ratio_BxT) - log_ratio_BxT


def clipped_surrogate(logp_BxT, old_logp_BxT, adv_BxT, eps_low: float, eps_high: float, dual_clip: float = 0.0):
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"):

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

    with DAPO's asymmetric "clip-higher" bounds (Yu et al. 2025) and, when dual_clip = c > 1, the
    dual clip of Ye et al. 2020 ("Mastering Complex Control in MOBA Games with Deep RL"): for A < 0
    the loss is capped at -c * A. dual_clip = 0 turns it off.

    Returns (loss_BxT, clipped_low_BxT, clipped_high_BxT): the float flags mark the tokens where the
    clip took effect, (ratio < 1 - eps_low) & (A < 0) and (ratio > 1 + eps_high) & (A > 0). The
    loss is written with those flags, so a ratio exactly at a bound counts as unclipped (full
    gradient) and a clipped token has zero gradient. Gradient flows only through `logp`.
    """
    if dual_clip != 0.0 and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be 0 (off) or > 1")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip eps_low={eps_low}, eps_high={eps_high} must be >= 0")
    old_logp_BxT = jax.lax.stop_gradient(_f32(old_logp_BxT))
    adv_BxT = jax.lax.stop_gradient(_f32(adv_BxT))
    ratio_BxT = jnp.exp(_f32(logp_BxT) - old_logp_BxT)
    low, high = 1.0 - eps_low, 1.0 + eps_high
    clipped_low_BxT = (ratio_BxT < low) & (adv_BxT < 0)
    clipped_high_BxT = (ratio_BxT > high) & (adv_BxT > 0)
    surrogate_BxT = jnp.where(clipped_high_BxT, high, jnp.where(clipped_low_BxT, low, ratio_BxT)) * adv_BxT
    loss_BxT = -surrogate_BxT
    if dual_clip:
        cap_BxT = -dual_clip * adv_BxT
        loss_BxT = jnp.where((adv_BxT < 0) & (loss_BxT > cap_BxT), cap_BxT, loss_BxT)
    return loss_BxT, clipped_low_BxT.astype(jnp.float32), clipped_high_BxT.astype(jnp.float32)


def value_loss(values_BxT, old_values_BxT, returns_BxT, clip: float):
    """Per-token clipped value loss (PPO2 baselines; Engstrom et al. 2020 discuss its effect):

        0.5 * max((v - R)**2, (old_v + clip(v - old_v, -clip, clip) - R)**2)

    clip <= 0: the plain 0.5 * (v - R)**2. Gradient flows only through `values`.
    """
    v_BxT = _f32(values_BxT)
    returns_BxT = jax.lax.stop_gradient(_f32(returns_BxT))
    loss_BxT = 0.5 * jnp.square(v_BxT - returns_BxT)
    if clip <= 0:
        return loss_BxT
    old_v_BxT = jax.lax.stop_gradient(_f32(old_values_BxT))
    v_clipped_BxT = old_v_BxT + jnp.clip(v_BxT - old_v_BxT, -clip, clip)
    return jnp.maximum(loss_BxT, 0.5 * jnp.square(v_clipped_BxT - returns_BxT))


def aggregate(loss_BxT, mask_BxT, how: str, max_len: int | None = None):
    """Reduce a per-token loss over the real tokens to a scalar:

        sequence_mean  (GRPO, Shao et al. 2024): mean over rows with >= 1 token of
                       sum_t(loss * mask) / sum_t(mask); rows without tokens are left out
                       (not counted as 0); 0 when no row has a token.
        token_mean     (DAPO, Yu et al. 2025): sum(loss * mask) / max(sum(mask), 1).
        constant_norm  (Dr. GRPO, Liu et al. 2025): sum(loss * mask) / (B * max_len); `max_len`
                       (the generation budget, a constant) must be given explicitly.

    Padding positions are selected away (jnp.where), so inf/NaN there does not leak into the value.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation how={how!r}: expected one of {AGGREGATIONS}")
    mask_BxT = _f32(mask_BxT)
    masked_BxT = jnp.where(mask_BxT > 0, _f32(loss_BxT) * mask_BxT, 0.0)
    if how == "token_mean":
        return jnp.sum(masked_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)
    if how == "constant_norm":
        if max_len is None or max_len <= 0:
            raise ValueError(f"aggregation 'constant_norm' needs max_len > 0, got max_len={max_len}")
        return jnp.sum(masked_BxT) / (loss_BxT.shape[0] * max_len)
    tokens_B = jnp.sum(mask_BxT, axis=1)
    row_B = jnp.sum(masked_BxT, axis=1) / jnp.maximum(tokens_B, 1.0)
    has_B = (tokens_B > 0).astype(jnp.float32)
    return jnp.sum(row_B * has_B) / jnp.maximum(jnp.sum(has_B), 1.0)


def masked_mean(x_BxT, mask_BxT):
    """sum(x * mask) / max(sum(mask), 1) in float32 (padding selected away, not multiplied)."""
    return aggregate(x_BxT, mask_BxT, "token_mean")


def entropy(logits_BxTxV):
    """Per-token entropy [B, T] of softmax(logits), -sum_v p log p, from log_softmax in float32;
    -inf logits (masked vocabulary entries) contribute 0."""
    logp_BxTxV = jax.nn.log_softmax(_f32(logits_BxTxV), axis=-1)
    p_BxTxV = jnp.exp(logp_BxTxV)
    return -jnp.sum(jnp.where(p_BxTxV > 0, p_BxTxV * logp_BxTxV, 0.0), axis=-1)


def _smoothed_logistic(z_B, eps: float):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss against a label that is
    flipped with probability eps (cDPO)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(z_B) - eps * jax.nn.log_sigmoid(-z_B)


def preference_loss(kind: str, policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, *,
                    beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    """Per-pair preference loss [B] from sequence log-probs (summed over response tokens).

    With h = (pc - rc) - (pr - rr), the policy's log-ratio margin over the reference's, and eps =
    label_smoothing:

        sigmoid  DPO (Rafailov et al. 2023), with cDPO's conservative smoothing (Mitchell 2023):
                 -(1 - eps) log s(beta h) - eps log s(-beta h)
        robust   rDPO (Chowdhury et al. 2024), unbiased under a label-flip rate eps < 0.5:
                 ((1 - eps)(-log s(beta h)) - eps(-log s(-beta h))) / (1 - 2 eps)
        ipo      IPO (Azar et al. 2023): (h - 1 / (2 beta))**2; label_smoothing must be 0.
        simpo    SimPO (Meng et al. 2024), reference-free: the CALLER passes length-normalised
                 (average per-token) log-probs as policy_*; ref_* are ignored (may be None):
                 -log s(beta (pc - pr) - simpo_gamma), smoothed like sigmoid when eps > 0.

    s = sigmoid. simpo_gamma must be 0 unless kind == "simpo".
    """
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss kind={kind!r}: expected one of {PREFERENCE_LOSSES}")
    if not beta > 0:
        raise ValueError(f"preference loss beta={beta} must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"preference loss label_smoothing={label_smoothing} must be in [0, 0.5)")
    if kind == "ipo" and label_smoothing:
        raise ValueError(f"preference loss 'ipo' takes no label_smoothing (got {label_smoothing})")
    if kind != "simpo" and simpo_gamma:
        raise ValueError(f"simpo_gamma={simpo_gamma} applies only to kind='simpo' (got kind={kind!r})")
    pc_B, pr_B = _f32(policy_chosen_B), _f32(policy_rejected_B)
    if kind == "simpo":
        return _smoothed_logistic(beta * (pc_B - pr_B) - simpo_gamma, label_smoothing)
    if ref_chosen_B is None or ref_rejected_B is None:
        raise ValueError(f"preference loss {kind!r} needs reference log-probs (ref_chosen/ref_rejected are None)")
    h_B = (pc_B - jax.lax.stop_gradient(_f32(ref_chosen_B))) - (pr_B - jax.lax.stop_gradient(_f32(ref_rejected_B)))
    if kind == "ipo":
        return jnp.square(h_B - 1.0 / (2.0 * beta))
    if kind == "sigmoid":
        return _smoothed_logistic(beta * h_B, label_smoothing)
    eps = label_smoothing
    return ((1.0 - eps) * -jax.nn.log_sigmoid(beta * h_B) - eps * -jax.nn.log_sigmoid(-beta * h_B)) / (1.0 - 2.0 * eps)


def bradley_terry_loss(reward_chosen_B, reward_rejected_B, margin_B=None):
    """Per-pair reward-model loss -log sigmoid(r_chosen - r_rejected - margin) (Bradley & Terry
    1952; Ouyang et al. 2022); `margin_B` is Llama 2's preference-strength margin (Touvron et al.
    2023), None = 0."""
    diff_B = _f32(reward_chosen_B) - _f32(reward_rejected_B)
    if margin_B is not None:
        diff_B = diff_B - _f32(margin_B)
    return -jax.nn.log_sigmoid(diff_B)
