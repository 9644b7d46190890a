"""One pure loss per training mode: (params, batch, rng, *, model) -> (loss, metrics).

`rng` is None for evaluation (dropout off). Losses are token-weighted means in float32;
metrics carry sums where a mean across batches must be exact (`*_sum` and their counts).
Each mode's `*_summary` turns those sums, added over every eval batch, into its eval scalars
(modes.py pairs each mode with its loss and summary).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood [B, L] in float32."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return logz_BxL - target_logit_BxL


def argmax_first(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum wins ties), as two plain reductions: XLA:CPU
    runs argmax's (value, index) reduction far slower than plain reductions (README, Performance)."""
    max_x1 = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == max_x1, iota, x.shape[-1]), axis=-1)


def weighted_nll(logits_BxLxV, targets_BxL, weights_BxL):
    """(mean NLL, NLL sum, correct argmax count, weight sum) over the weighted positions."""
    w_BxL = weights_BxL.astype(jnp.float32)
    count = jnp.sum(w_BxL)
    loss_sum = jnp.sum(token_nll(logits_BxLxV, targets_BxL) * w_BxL)
    correct = jnp.sum((argmax_first(logits_BxLxV) == targets_BxL) * w_BxL)
    return loss_sum / jnp.maximum(count, 1.0), loss_sum, correct, count


def causal_lm(params, batch, rng, *, model):
    """Next-token prediction over packed windows; `weights` zero cross-document targets (and, for
    SFT rows, every target outside an assistant turn)."""
    rngs = None if rng is None else {"dropout": rng}
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                               deterministic=rng is None, rngs=rngs)
    loss, loss_sum, correct, tokens = weighted_nll(logits_BxLxV, batch["targets"], batch["weights"])
    return loss, {"loss": loss, "loss_sum": loss_sum, "correct_sum": correct, "tokens": tokens}


def masked_lm(params, batch, rng, *, model):
    """MLM cross-entropy over the masked positions (+ NSP cross-entropy on <cls> when model.nsp)."""
    rngs = None if rng is None else {"dropout": rng}
    logits_BxLxV, nsp_Bx2 = model.apply({"params": params}, batch["inputs"], batch["positions"],
                                        batch["segment_ids"], batch["token_types"], deterministic=rng is None,
                                        rngs=rngs)
    mlm_loss, mlm_loss_sum, mlm_correct, masked = weighted_nll(logits_BxLxV, batch["targets"], batch["mlm_weights"])
    metrics = {"mlm_loss": mlm_loss, "mlm_loss_sum": mlm_loss_sum, "mlm_correct_sum": mlm_correct,
               "masked_tokens": masked}
    loss = mlm_loss
    if nsp_Bx2 is not None:
        nsp_w_B = batch["nsp_weight"].astype(jnp.float32)
        nsp_nll_B = token_nll(nsp_Bx2[:, None, :], batch["nsp_label"][:, None])[:, 0]
        pairs = jnp.sum(nsp_w_B)
        nsp_loss_sum = jnp.sum(nsp_nll_B * nsp_w_B)
        nsp_loss = nsp_loss_sum / jnp.maximum(pairs, 1.0)
        nsp_correct = jnp.sum((jnp.argmax(nsp_Bx2, -1) == batch["nsp_label"]) * nsp_w_B)
        metrics.update(nsp_loss=nsp_loss, nsp_loss_sum=nsp_loss_sum, nsp_correct_sum=nsp_correct, pairs=pairs)
        loss = loss + nsp_loss
    metrics["loss"] = loss
    return loss, metrics


def classify(params, batch, rng, *, model):
    """Cross-entropy of the pooled classification head; sums for accuracy and macro-F1."""
    rngs = None if rng is None else {"dropout": rng}
    logits_BxC = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                             batch["token_types"], deterministic=rng is None, rngs=rngs)
    w_B = batch["weight"].astype(jnp.float32)
    nll_B = token_nll(logits_BxC[:, None, :], batch["label"][:, None])[:, 0]
    examples = jnp.sum(w_B)
    loss_sum = jnp.sum(nll_B * w_B)
    loss = loss_sum / jnp.maximum(examples, 1.0)
    n_classes = logits_BxC.shape[-1]
    pred_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, -1), n_classes) * w_B[:, None]
    true_BxC = jax.nn.one_hot(batch["label"], n_classes) * w_B[:, None]
    return loss, {"loss": loss, "loss_sum": loss_sum, "correct_sum": jnp.sum(pred_BxC * true_BxC),
                  "examples": examples, "true_pos_C": jnp.sum(pred_BxC * true_BxC, 0),
                  "predicted_C": jnp.sum(pred_BxC, 0), "actual_C": jnp.sum(true_BxC, 0)}


def qa(params, batch, rng, *, model):
    """Extractive QA: mean of the start- and end-position cross-entropies over weighted windows."""
    rngs = None if rng is None else {"dropout": rng}
    start_BxL, end_BxL = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                                     batch["token_types"], deterministic=rng is None, rngs=rngs)
    w_B = batch["weight"].astype(jnp.float32)
    start_nll_B = token_nll(start_BxL[:, None, :], batch["start"][:, None])[:, 0]
    end_nll_B = token_nll(end_BxL[:, None, :], batch["end"][:, None])[:, 0]
    examples = jnp.sum(w_B)
    loss_sum = jnp.sum(0.5 * (start_nll_B + end_nll_B) * w_B)
    loss = loss_sum / jnp.maximum(examples, 1.0)
    return loss, {"loss": loss, "loss_sum": loss_sum, "examples": examples,
                  "start_correct_sum": jnp.sum((jnp.argmax(start_BxL, -1) == batch["start"]) * w_B),
                  "end_correct_sum": jnp.sum((jnp.argmax(end_BxL, -1) == batch["end"]) * w_B)}


def _ratio(totals, num: str, den: str) -> float:
    return float(totals[num]) / max(float(totals[den]), 1.0)


def causal_summary(totals: dict) -> dict:
    loss = _ratio(totals, "loss_sum", "tokens")
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/accuracy": _ratio(totals, "correct_sum", "tokens")}


def mlm_summary(totals: dict) -> dict:
    out = {"eval/mlm_loss": _ratio(totals, "mlm_loss_sum", "masked_tokens"),
           "eval/mlm_accuracy": _ratio(totals, "mlm_correct_sum", "masked_tokens")}
    out["eval/loss"] = out["eval/mlm_loss"]
    if "pairs" in totals:
        out["eval/nsp_loss"] = _ratio(totals, "nsp_loss_sum", "pairs")
        out["eval/nsp_accuracy"] = _ratio(totals, "nsp_correct_sum", "pairs")
        out["eval/loss"] += out["eval/nsp_loss"]
    return out


def macro_f1(true_pos_C, predicted_C, actual_C) -> float:
    """Mean F1 over the classes that occur (as label or prediction); 0 for none."""
    tp, pred, act = (np.asarray(x, np.float64) for x in (true_pos_C, predicted_C, actual_C))
    present = (pred + act) > 0
    f1 = np.where(present, 2 * tp / np.maximum(pred + act, 1e-12), 0.0)
    return float(f1[present].mean()) if present.any() else 0.0


def classify_summary(totals: dict) -> dict:
    return {"eval/loss": _ratio(totals, "loss_sum", "examples"),
            "eval/accuracy": _ratio(totals, "correct_sum", "examples"),
            "eval/macro_f1": macro_f1(totals["true_pos_C"], totals["predicted_C"], totals["actual_C"])}


def qa_summary(totals: dict) -> dict:
    """Per-window loss and start/end token accuracy; exact match and F1 come from modes' extra_eval."""
    return {"eval/loss": _ratio(totals, "loss_sum", "examples"),
            "eval/start_accuracy": _ratio(totals, "start_correct_sum", "examples"),
            "eval/end_accuracy": _ratio(totals, "end_correct_sum", "examples")}


def sum_metrics(outputs) -> dict:
    """Adds each metric over the eval batches (float64); the summaries read only the sums and counts."""
    totals: dict = {}
    for out in outputs:
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    return totals
