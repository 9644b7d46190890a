"""The frozen reference policy's sequence log-probs, computed once per example and cached (DPO).

DPO compares the policy's log-probs of the chosen and rejected responses with a reference
model's. The reference never changes, so its log-probs are computed once, before training, and
stored with the examples (`ref_chosen_logp`, `ref_rejected_logp`): a train step runs one model,
not two. The reference is the `init_from` run's model (for a LoRA policy that is exactly its
LoRA-disabled base: the adapters start at zero on those weights).

`in_batches` is the one fixed-shape batching of rows through a scoring function: this module's reference
pass, the RL loop's trainer and reference passes (rl/loop.py) and scripts/policy_kl.py use it.

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
from model import build, decode

log = logging.getLogger("lmstack")
ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def sequence_logps(model, params, rows: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of the weighted targets' log-probs [N], their count [N]) of one model over rows [N, L], by the
    same float32 formula objectives.dpo uses (policy == reference gives implicit rewards of exactly 0)."""
    logits_NxLxV = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"],
                               deterministic=True)
    return objectives.sequence_logps(logits_NxLxV, rows["targets"], rows["weights"])


def in_batches(fn, rows: dict, size: int, put=None):
    """fn(batch) over `rows` (a dict of arrays with N rows each) in batches of `size` rows, the last one padded
    with zero rows to `size` (one shape: one compile); `put` places each batch (e.g. sharding.put_batch).
    fn returns an array or a tuple of them (None allowed); returns the same structure as numpy arrays of the
    N real rows, in order."""
    if size <= 0:
        raise ValueError(f"in_batches: batch size {size} must be positive")
    n = len(next(iter(rows.values())))
    outs = []
    for lo in range(0, n, size):
        part = {k: np.asarray(v[lo:lo + size]) for k, v in rows.items()}
        real = len(next(iter(part.values())))
        if real < size:
            part = {k: np.concatenate([v, np.zeros((size - real, *v.shape[1:]), v.dtype)]) for k, v in part.items()}
        out = fn(part if put is None else put(part))
        outs.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], decode.to_host(out)))  # multi-host: gathered
    if not outs:
        raise ValueError("in_batches: no rows")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


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
    if not examples:
        return
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
    out = {}
    for side in SIDES:
        rows = {k: np.stack([ex[f"{side}_{k}"] for ex in examples]) for k in ROW_KEYS}
        out[side] = in_batches(lambda batch: fn(params, batch)[0], rows, batch_size).astype(np.float32)
    for i, ex in enumerate(examples):
        ex["ref_chosen_logp"], ex["ref_rejected_logp"] = out["chosen"][i], out["rejected"][i]
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, fingerprint=np.array(fingerprint), chosen=out["chosen"], rejected=out["rejected"])
        os.replace(tmp, path)
    log.info("reference log-probs of %d %s pairs computed with %s (step %d), cached in %s", len(examples), split,
             init_from, step, path)
