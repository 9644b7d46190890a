"""The frozen reference policy's sequence log-probs, computed once per example and cached (DPO).

DPO compares the policy's log-probs of the chosen and rejected responses with a reference
model's. The reference never changes, so its log-probs are computed once, before training, and
stored with the examples (`ref_chosen_logp`, `ref_rejected_logp`): a train step runs one model,
not two. The reference is the `init_from` run's model (for a LoRA policy that is exactly its
LoRA-disabled base: the adapters start at zero on those weights).

Cache: WORKDIR/reference_logps_<split>_<digest>.npz, named by a digest of its fingerprint: the reference
checkpoint (path, step, a digest of every parameter), the model config and the examples' tokens.
Anything else (another checkpoint, changed data, another seq_len) computes a new one beside it
(scripts/evaluate.py --data=OTHER adds its own and leaves the training splits' files alone).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import jax
import ml_collections
import numpy as np

import checkpoint
import objectives
from data.preference import SIDES
from model import build

log = logging.getLogger("lmstack")
ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def sequence_logps(model, params, rows: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of the weighted targets' log-probs [N], their count [N]) of one model over rows [N, L], by the
    same float32 formula objectives.dpo uses (policy == reference gives implicit rewards of exactly 0)."""
    logits_NxLxV = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"],
                               deterministic=True)
    return objectives.sequence_logps(logits_NxLxV, rows["targets"], rows["weights"])


def _digest_params(params) -> str:
    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.asarray(x)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((x.shape, x.dtype)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _digest_examples(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for side in SIDES:
            for k in ("inputs", "targets", "weights"):
                h.update(np.ascontiguousarray(ex[f"{side}_{k}"]).tobytes())
    return h.hexdigest()


def add_reference_logps(examples: list[dict], *, init_from: str, tok, workdir: str, split: str,
                        batch_size: int) -> None:
    """Sets ex['ref_chosen_logp'], ex['ref_rejected_logp'] (float32) on every example, from the cache
    when its fingerprint matches, else computed with init_from's latest checkpoint (and cached)."""
    saved, params, step = checkpoint.load_for_inference(init_from)
    ref_config = ml_collections.ConfigDict(saved)
    model = build.causal_lm(ref_config, tok.vocab_size, tok.base_size)
    fingerprint = json.dumps({"init_from": os.path.abspath(init_from), "step": int(step),
                              "params": _digest_params(params), "model": saved.get("model"),
                              "lora": saved.get("lora"), "examples": _digest_examples(examples),
                              "n": len(examples)}, sort_keys=True)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    path = os.path.join(workdir, f"reference_logps_{split}_{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            if str(z["fingerprint"]) == fingerprint:
                for ex, c, r in zip(examples, z["chosen"], z["rejected"]):
                    ex["ref_chosen_logp"], ex["ref_rejected_logp"] = np.float32(c), np.float32(r)
                log.info("reference log-probs of %d %s pairs: cached in %s", len(examples), split, path)
                return
    params = jax.device_put(params, jax.devices()[0])
    fn = jax.jit(functools.partial(sequence_logps, model))
    out = {side: np.zeros(len(examples), np.float32) for side in SIDES}
    for lo in range(0, len(examples), batch_size):
        group = examples[lo:lo + batch_size]
        pad = batch_size - len(group)  # a fixed shape: one compile
        for side in SIDES:
            rows = {k: np.stack([ex[f"{side}_{k}"] for ex in group] + [np.zeros_like(group[0][f"{side}_{k}"])] * pad)
                    for k in ROW_KEYS}
            logp_N, _ = fn(params, rows)
            out[side][lo:lo + len(group)] = np.asarray(logp_N)[:len(group)]
    for i, ex in enumerate(examples):
        ex["ref_chosen_logp"], ex["ref_rejected_logp"] = out["chosen"][i], out["rejected"][i]
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, fingerprint=np.array(fingerprint), chosen=out["chosen"], rejected=out["rejected"])
        os.replace(tmp, path)
    log.info("reference log-probs of %d %s pairs computed with %s (step %d), cached in %s", len(examples), split,
             init_from, step, path)
