"""One pure loss per training mode: (params, batch, rng, *, model) -> (loss, metrics).

`rng` is None for evaluation (dropout off). Losses are token-weighted means in float32;
metrics carry sums where a mean across batches must be exact (`*_sum`, `tokens`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood [B, L] in float32."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return logz_BxL - target_logit_BxL


def causal_lm(params, batch, rng, *, model):
    """Next-token prediction over packed windows; `weights` zero cross-document targets."""
    rngs = None if rng is None else {"dropout": rng}
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                               deterministic=rng is None, rngs=rngs)
    nll_BxL = token_nll(logits_BxLxV, batch["targets"])
    w_BxL = batch["weights"].astype(jnp.float32)
    tokens = jnp.sum(w_BxL)
    loss_sum = jnp.sum(nll_BxL * w_BxL)
    correct = jnp.sum((jnp.argmax(logits_BxLxV, -1) == batch["targets"]) * w_BxL)
    loss = loss_sum / jnp.maximum(tokens, 1.0)
    return loss, {"loss": loss, "loss_sum": loss_sum, "correct_sum": correct, "tokens": tokens}


OBJECTIVES = {
    "causal": causal_lm,
}
