"""One pure loss per training mode: (params, batch, rng, *, model) -> (loss, metrics).

`rng` is None for evaluation (dropout off). Losses are token-weighted means in float32;
metrics carry sums where a mean across batches must be exact (`*_sum` and their counts).
Each mode's `*_summary` turns those sums, added over every eval batch, into its eval scalars
(modes.py pairs each mode with its loss and summary).
"""

from __future__ import annotations

import math

import logging

import jax
import jax.numpy as jnp
import numpy as np

from rl import losses as rl_losses

log = logging.getLogger("lmstack")
PAIR_ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


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


def _both_sides(batch) -> dict:
    """A preference batch's chosen rows then its rejected rows, [2B, L] per key: one forward for both."""
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in PAIR_ROW_KEYS}


def reward(params, batch, rng, *, model, center_coef: float = 0.0):
    """Bradley-Terry loss of a scalar reward model on (chosen, rejected) pairs, with the pair's margin
    (Llama 2) and an optional reward-centering term center_coef * (r_c + r_r)^2 (Eisenstein et al. 2023)."""
    rows = _both_sides(batch)
    rngs = None if rng is None else {"dropout": rng}
    r_2B = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"],
                       deterministic=rng is None, rngs=rngs)
    b = batch["weight"].shape[0]
    rc_B, rr_B = r_2B[:b], r_2B[b:]
    w_B = batch["weight"].astype(jnp.float32)
    pairs = jnp.sum(w_B)
    bt_sum = jnp.sum(rl_losses.bradley_terry_loss(rc_B, rr_B, batch["margin"]) * w_B)
    center_sum = jnp.sum((rc_B + rr_B) ** 2 * w_B)
    bt_loss = bt_sum / jnp.maximum(pairs, 1.0)
    loss = bt_loss + center_coef * center_sum / jnp.maximum(pairs, 1.0)
    return loss, {"loss": loss, "bt_loss": bt_loss, "loss_sum": bt_sum, "pairs": pairs,
                  "correct_sum": jnp.sum((rc_B > rr_B) * w_B), "margin_sum": jnp.sum((rc_B - rr_B) * w_B),
                  "reward_sum": jnp.sum((rc_B + rr_B) * w_B), "reward_sq_sum": jnp.sum((rc_B ** 2 + rr_B ** 2) * w_B)}


def sequence_logps(logits_NxLxV, targets_NxL, weights_NxL):
    """(sum of the weighted targets' log-probs [N], their weight sum [N]) in float32."""
    w_NxL = weights_NxL.astype(jnp.float32)
    return -jnp.sum(token_nll(logits_NxLxV, targets_NxL) * w_NxL, axis=-1), jnp.sum(w_NxL, axis=-1)


def dpo(params, batch, rng, *, model, loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
        simpo_gamma: float = 0.0, nll_coef: float = 0.0):
    """Direct preference optimisation and its variants (rl/losses.preference_loss) on a policy; the
    reference's sequence log-probs come with the batch (rl/reference.py computed them once). SimPO
    uses length-normalised policy log-probs and no reference. Implicit rewards: beta * (policy - ref).
    `nll_coef` > 0 adds that multiple of the chosen response's mean token NLL to each pair's loss (RPO:
    it holds the chosen answers' likelihood up while the margin grows)."""
    rows = _both_sides(batch)
    rngs = None if rng is None else {"dropout": rng}
    logits_2BxLxV = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"],
                                deterministic=rng is None, rngs=rngs)
    logp_2B, n_2B = sequence_logps(logits_2BxLxV, rows["targets"], rows["weights"])
    b = batch["weight"].shape[0]
    pc_B, pr_B, nc_B, nr_B = logp_2B[:b], logp_2B[b:], n_2B[:b], n_2B[b:]
    refc_B, refr_B = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
    if loss == "simpo":
        ac_B, ar_B = pc_B / jnp.maximum(nc_B, 1.0), pr_B / jnp.maximum(nr_B, 1.0)
        loss_B = rl_losses.preference_loss("simpo", ac_B, ar_B, None, None, beta=beta, simpo_gamma=simpo_gamma,
                                           label_smoothing=label_smoothing)
        reward_c_B, reward_r_B = beta * ac_B, beta * ar_B
    else:
        loss_B = rl_losses.preference_loss(loss, pc_B, pr_B, refc_B, refr_B, beta=beta,
                                           label_smoothing=label_smoothing)
        reward_c_B, reward_r_B = beta * (pc_B - refc_B), beta * (pr_B - refr_B)
    if nll_coef:
        loss_B = loss_B + nll_coef * (-pc_B / jnp.maximum(nc_B, 1.0))
    w_B = batch["weight"].astype(jnp.float32)
    pairs = jnp.sum(w_B)
    loss_sum = jnp.sum(loss_B * w_B)
    mean = loss_sum / jnp.maximum(pairs, 1.0)
    ref_w_B = w_B * batch["ref_known"].astype(jnp.float32)
    return mean, {"loss": mean, "loss_sum": loss_sum, "pairs": pairs,
                  "correct_sum": jnp.sum((reward_c_B > reward_r_B) * w_B),
                  "reward_chosen_sum": jnp.sum(reward_c_B * w_B), "reward_rejected_sum": jnp.sum(reward_r_B * w_B),
                  "chosen_logp_sum": jnp.sum(pc_B * w_B), "rejected_logp_sum": jnp.sum(pr_B * w_B),
                  "chosen_tokens": jnp.sum(nc_B * w_B),
                  "chosen_logp_change_sum": jnp.sum((pc_B - refc_B) * ref_w_B), "ref_pairs": jnp.sum(ref_w_B)}


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


def reward_summary(totals: dict) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected), mean margin, and the rewards' mean and std."""
    n = max(float(totals["pairs"]), 1.0)
    mean = float(totals["reward_sum"]) / (2 * n)
    var = max(float(totals["reward_sq_sum"]) / (2 * n) - mean ** 2, 0.0)
    return {"eval/loss": _ratio(totals, "loss_sum", "pairs"), "eval/accuracy": _ratio(totals, "correct_sum", "pairs"),
            "eval/margin": _ratio(totals, "margin_sum", "pairs"), "eval/reward_mean": mean,
            "eval/reward_std": math.sqrt(var)}


DPO_CHOSEN_DROP_WARN = 1.0  # nats per chosen response: a larger mean fall below the reference is warned about


def dpo_summary(totals: dict) -> dict:
    """Loss, preference accuracy (implicit reward of chosen > rejected), implicit rewards and margin, and
    the chosen responses' log-prob: per response, per token, and its change from the reference. DPO can
    raise the margin while BOTH log-probs fall (the chosen answer gets less likely): that is warned about."""
    out = {"eval/loss": _ratio(totals, "loss_sum", "pairs"), "eval/accuracy": _ratio(totals, "correct_sum", "pairs"),
           "eval/reward_chosen": _ratio(totals, "reward_chosen_sum", "pairs"),
           "eval/reward_rejected": _ratio(totals, "reward_rejected_sum", "pairs"),
           "eval/chosen_logp": _ratio(totals, "chosen_logp_sum", "pairs"),
           "eval/rejected_logp": _ratio(totals, "rejected_logp_sum", "pairs"),
           "eval/chosen_logp_per_token": _ratio(totals, "chosen_logp_sum", "chosen_tokens")}
    out["eval/margin"] = out["eval/reward_chosen"] - out["eval/reward_rejected"]
    if float(totals.get("ref_pairs", 0.0)) > 0:
        change = _ratio(totals, "chosen_logp_change_sum", "ref_pairs")
        out["eval/chosen_logp_change"] = change
        if change < -DPO_CHOSEN_DROP_WARN:
            log.warning("dpo: the chosen responses' log-prob fell %.2f nats below the reference's on average "
                        "(log-prob %.2f): the margin grows by pushing both responses down, the known DPO failure; "
                        "consider a lower optim.lr, a larger dpo.beta, fewer steps, or dpo.loss='ipo'",
                        -change, out["eval/chosen_logp"])
    return out


def no_summary(totals: dict) -> dict:
    """Modes whose evaluation is all decoded (RL: exact match of greedy answers): no summed eval batches."""
    del totals
    return {}
