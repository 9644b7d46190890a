"""The RL train-step losses (pure, jitted by steps.make_train_step): GRPO's and PPO's.

Both read a batch of rollout rows (rl/rollout.py): `inputs/targets/positions/segment_ids` [N, L],
`mask` [N, L] (1 on the completion tokens that get a loss), `old_logp` [N, L] (the policy's log-probs
of those tokens before this iteration's updates: the importance-ratio denominator), plus
- GRPO: `advantages` [N] (one per completion, rl/advantages.group_advantages) and, with beta > 0,
  `ref_logp` [N, L] (the reference policy's): loss = aggregate(clipped surrogate + beta * KL). With
  one update per iteration (`single_update`), the params ARE the sampling policy's, so `old_logp` is
  the step's own log-probs under stop_gradient (ratio exactly 1) and the loop skips a forward pass;
- PPO: `advantages`, `returns`, `old_values` [N, L] (GAE over per-token rewards that already hold the
  KL penalty): loss = aggregate(clipped surrogate) + vf_coef * aggregate(clipped value loss)
  - entropy_coef * aggregate(entropy).
A per-group batch (rl/groups.py: one model row per prompt, per-token arrays [P, G, T]) is scored at each
completion token's `src` position and then read as rows [P * G, T]: the same losses on the same numbers.
Metrics are means over the masked tokens (a minibatch's); the loop averages them over minibatches.
With `ptx_coef` > 0 the batch also holds SFT rows (`ptx_*` keys: inputs/targets/positions/segment_ids/
weights [R, S]) and either loss adds ptx_coef x their mean token NLL (InstructGPT's PPO-ptx).
Both also report the gap between these log-probs and the sampler's (`sampler_logp`, over every
completion token): at an iteration's first minibatch the params are the ones that sampled, so it
is the sampler/trainer consistency check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives import token_nll, weighted_nll
from rl import groups, losses

PTX = "ptx_"  # batch keys of the SFT rows of the PPO-ptx term (rl.ptx_coef): ptx_inputs, ptx_targets, ...


def _apply(model, params, batch, rng):
    """(logits [N, L, V], values [N, L] or None, the batch as rows): a per-group batch (rl/groups.py: one
    model row per prompt) comes back as completion-major rows, scored at each token's `src` position."""
    rngs = None if rng is None else {"dropout": rng}
    out = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                      deterministic=rng is None, rngs=rngs)
    logits, values = out if isinstance(out, tuple) else (out, None)
    if not groups.is_grouped(batch):
        return logits, values, batch
    src = batch["src"]
    return (groups.gather(logits, src), None if values is None else groups.gather(values, src),
            groups.flat(batch))


def _split_ptx(batch: dict) -> tuple[dict, dict]:
    """(the rollout batch, the PPO-ptx SFT rows without their prefix; {} when the batch has none)."""
    ptx = {k[len(PTX):]: v for k, v in batch.items() if k.startswith(PTX)}
    return {k: v for k, v in batch.items() if not k.startswith(PTX)}, ptx


def _with_ptx(loss, metrics: dict, model, params, ptx: dict, rng, coef: float):
    """loss + coef x the mean token NLL of the SFT rows (InstructGPT's PPO-ptx: the policy keeps its
    supervised behaviour while RL moves it); the NLL is logged as `ptx_loss`."""
    if not ptx:
        return loss, metrics
    rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, 1)}
    out = model.apply({"params": params}, ptx["inputs"], ptx["positions"], ptx["segment_ids"],
                      deterministic=rng is None, rngs=rngs)
    nll, _, _, _ = weighted_nll(out[0] if isinstance(out, tuple) else out, ptx["targets"], ptx["weights"])
    loss = loss + coef * nll
    return loss, dict(metrics, loss=loss, ptx_loss=nll)


def _policy_metrics(logits_NxLxV, logp_NxL, old_NxL, batch, clip_low_NxL, clip_high_NxL) -> dict:
    mask_NxL = batch["mask"]
    log_ratio_NxL = logp_NxL - old_NxL
    comp_NxL = batch["completion"] > 0
    gap_NxL = jnp.where(comp_NxL, jnp.abs(logp_NxL - batch["sampler_logp"]), 0.0)
    return {"entropy": losses.masked_mean(losses.entropy(logits_NxLxV), mask_NxL),
            "logp_gap_max": jnp.max(gap_NxL), "logp_gap_sum": jnp.sum(gap_NxL),
            "completion_tokens": jnp.sum(comp_NxL.astype(jnp.float32)),
            "clip_low": losses.masked_mean(clip_low_NxL, mask_NxL),
            "clip_high": losses.masked_mean(clip_high_NxL, mask_NxL),
            "approx_kl": losses.masked_mean(0.5 * log_ratio_NxL ** 2, mask_NxL),
            "tokens": jnp.sum(mask_NxL.astype(jnp.float32))}


def grpo(params, batch, rng, *, model, eps_low: float, eps_high: float, dual_clip: float, beta: float,
         kl_estimator: str, aggregation: str, max_len: int, single_update: bool = False, ptx_coef: float = 0.0):
    """GRPO (Shao et al. 2024) with clip-higher (DAPO) and the aggregation of `aggregation`."""
    batch, ptx = _split_ptx(batch)
    logits_NxLxV, _, batch = _apply(model, params, batch, rng)
    logp_NxL = -token_nll(logits_NxLxV, batch["targets"])
    old_NxL = jax.lax.stop_gradient(logp_NxL) if single_update else batch["old_logp"]
    adv_NxL = jnp.broadcast_to(batch["advantages"][:, None], logp_NxL.shape)
    pg_NxL, low_NxL, high_NxL = losses.clipped_surrogate(logp_NxL, old_NxL, adv_NxL, eps_low, eps_high, dual_clip)
    metrics = _policy_metrics(logits_NxLxV, logp_NxL, old_NxL, batch, low_NxL, high_NxL)
    per_token_NxL = pg_NxL
    if beta > 0:
        kl_NxL = losses.kl_estimate(logp_NxL, batch["ref_logp"], kl_estimator)
        per_token_NxL = per_token_NxL + beta * kl_NxL
        # logged with k3 whatever the penalty's estimator: non-negative, so a negative value means a bug
        metrics["kl"] = losses.masked_mean(losses.kl_estimate(logp_NxL, batch["ref_logp"], "k3"), batch["mask"])
    loss = losses.aggregate(per_token_NxL, batch["mask"], aggregation, max_len)
    metrics.update(loss=loss, pg_loss=losses.aggregate(pg_NxL, batch["mask"], aggregation, max_len))
    return _with_ptx(loss, metrics, model, params, ptx, rng, ptx_coef)


def ppo(params, batch, rng, *, model, eps_low: float, eps_high: float, dual_clip: float, value_clip: float,
        vf_coef: float, entropy_coef: float, aggregation: str, max_len: int, ptx_coef: float = 0.0):
    """PPO (Schulman et al. 2017) with a value head on the policy's trunk (rl/ppo's critic)."""
    batch, ptx = _split_ptx(batch)
    logits_NxLxV, values_NxL, batch = _apply(model, params, batch, rng)
    logp_NxL = -token_nll(logits_NxLxV, batch["targets"])
    mask_NxL = batch["mask"]
    pg_NxL, low_NxL, high_NxL = losses.clipped_surrogate(logp_NxL, batch["old_logp"], batch["advantages"], eps_low,
                                                         eps_high, dual_clip)
    vf_NxL = losses.value_loss(values_NxL, batch["old_values"], batch["returns"], value_clip)
    metrics = _policy_metrics(logits_NxLxV, logp_NxL, batch["old_logp"], batch, low_NxL, high_NxL)
    pg = losses.aggregate(pg_NxL, mask_NxL, aggregation, max_len)
    vf = losses.aggregate(vf_NxL, mask_NxL, aggregation, max_len)
    loss = pg + vf_coef * vf
    if entropy_coef:
        loss = loss - entropy_coef * losses.aggregate(losses.entropy(logits_NxLxV), mask_NxL, aggregation, max_len)
    metrics.update(loss=loss, pg_loss=pg, value_loss=vf)
    return _with_ptx(loss, metrics, model, params, ptx, rng, ptx_coef)


def token_logps(model, params, batch):
    """(log-probs of the targets [N, L] float32, values [N, L] or None): the trainer's view of a rollout."""
    logits_NxLxV, values_NxL, rows = _apply(model, params, batch, None)
    logp_NxL = -token_nll(logits_NxLxV, rows["targets"])
    if groups.is_grouped(batch):  # back to the batch's [P, G, T] (a minibatch or shard slices whole groups)
        shape = batch["src"].shape
        return logp_NxL.reshape(shape), None if values_NxL is None else values_NxL.reshape(shape)
    return logp_NxL, values_NxL
