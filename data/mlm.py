"""Masked-LM (+ next-sentence prediction) examples: pure numpy, random access, deterministic.

Documents are token arrays (no <eos>). Example i starts at anchor i: a (document, offset) pair,
anchors every `seq_len - 3` tokens through each document. Everything random about example i
(the A/B split, true or random next segment, which tokens are masked and how) comes from
`np.random.default_rng([seed, i])`, so an example is a pure function of its index: the grain
iterator's saved position is all that resume needs, and it stays bit-exact.

With NSP:    <cls> A <sep> B <sep>   token_types 0 ... 0 1 ... 1   nsp_label 1 = B follows A
             A is cut from the anchor at a random length; B is the rest of the anchor's room (label 1) or
             as many tokens of another document (label 0; fewer only if that document is shorter), so
             the padding does not tell the label.
Without:     <cls> A <sep>
BERT masking: `mask_prob` of the non-special tokens (rounded, at least 1) are chosen; of those
80% become <mask>, 10% a random base-vocabulary token, 10% stay. Specials and padding are never
chosen. `mlm_weights` marks the chosen positions; `targets` hold the original tokens.
"""

from __future__ import annotations

import grain
import numpy as np

from data import pipeline
from data.sources import DataError


class MlmSource:
    """Random-access MLM/NSP examples of length `seq_len` (a grain data source)."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, *, seed: int, base_size: int, cls_id: int,
                 sep_id: int, mask_id: int, pad_id: int, nsp: bool = True, mask_prob: float = 0.15,
                 mask_token_frac: float = 0.8, random_token_frac: float = 0.1):
        if seq_len < 6:
            raise DataError(f"data.seq_len={seq_len} is too short for <cls> A <sep> B <sep> (need >= 6)")
        if not 0.0 < mask_prob < 1.0:
            raise DataError(f"mlm.mask_prob={mask_prob} must be in (0, 1)")
        if not (mask_token_frac >= 0 and random_token_frac >= 0 and mask_token_frac + random_token_frac <= 1.0):  # NaN
            raise DataError(f"mlm.mask_token_frac={mask_token_frac} + mlm.random_token_frac={random_token_frac} "
                            "must be non-negative and sum to <= 1")
        self.docs = [np.asarray(d, np.int32) for d in docs if len(d) >= 2]
        if nsp and len(self.docs) < 2:
            raise DataError(f"NSP needs at least 2 documents of >= 2 tokens, got {len(self.docs)}")
        self.seq_len, self.seed, self.nsp = seq_len, seed, nsp
        self.base_size, self.cls_id, self.sep_id, self.mask_id, self.pad_id = base_size, cls_id, sep_id, mask_id, \
            pad_id
        self.mask_prob, self.mask_token_frac, self.random_token_frac = mask_prob, mask_token_frac, random_token_frac
        self.budget = seq_len - (3 if nsp else 2)  # content tokens per example
        anchors = [(d, s) for d, doc in enumerate(self.docs) for s in range(0, len(doc) - 1, self.budget)]
        self.anchors = np.array(anchors, np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.anchors)

    def _pair(self, i: int, rng: np.random.Generator):
        d, start = (int(x) for x in self.anchors[i])
        doc = self.docs[d]
        avail = min(self.budget, len(doc) - start)  # >= 2 by construction
        if not self.nsp:
            return doc[start:start + avail], None, -1
        a_len = int(rng.integers(1, avail))  # leaves >= 1 token for a true next segment
        a = doc[start:start + a_len]
        if rng.random() < 0.5:
            return a, doc[start + a_len:start + avail], 1
        other = int(rng.integers(0, len(self.docs) - 1))
        other += other >= d  # any document but this one
        odoc = self.docs[other]
        b_len = min(avail - a_len, len(odoc))  # as long as the true B: the padding must not tell the label
        b_start = int(rng.integers(0, len(odoc) - b_len + 1))
        return a, odoc[b_start:b_start + b_len], 0

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        a, b, is_next = self._pair(i, rng)
        cls, sep = np.array([self.cls_id], np.int32), np.array([self.sep_id], np.int32)
        parts = [cls, a, sep] + ([b, sep] if b is not None else [])
        tokens = np.concatenate(parts)
        n_a = len(a) + 2
        types = np.concatenate([np.zeros(n_a, np.int32), np.ones(len(tokens) - n_a, np.int32)])
        n, length = len(tokens), self.seq_len
        out_tokens = np.full(length, self.pad_id, np.int32)
        out_tokens[:n] = tokens
        token_types = np.zeros(length, np.int32)
        token_types[:n] = types
        segment_ids = np.zeros(length, np.int32)
        segment_ids[:n] = 1
        inputs, weights = mask_tokens(out_tokens, segment_ids, rng, base_size=self.base_size, mask_id=self.mask_id,
                                      mask_prob=self.mask_prob, mask_token_frac=self.mask_token_frac,
                                      random_token_frac=self.random_token_frac)
        return {"inputs": inputs, "targets": out_tokens, "mlm_weights": weights,
                "positions": np.arange(length, dtype=np.int32), "segment_ids": segment_ids,
                "token_types": token_types, "nsp_label": np.int32(max(is_next, 0)),
                "nsp_weight": np.float32(1.0 if self.nsp else 0.0)}


def mask_tokens(tokens: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator, *, base_size: int,
                mask_id: int, mask_prob: float, mask_token_frac: float = 0.8,
                random_token_frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking -> (inputs, float32 weights at the chosen positions). Only base-vocabulary
    tokens (id < base_size) in non-pad positions can be chosen."""
    candidates = np.flatnonzero((tokens < base_size) & (tokens >= 0) & (segment_ids != 0))
    inputs = tokens.copy()
    weights = np.zeros(len(tokens), np.float32)
    if len(candidates) == 0:
        return inputs, weights
    k = max(1, int(round(mask_prob * len(candidates))))
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    u = rng.random(k)
    random_tokens = rng.integers(0, base_size, size=k).astype(np.int32)
    inputs[chosen] = np.where(u < mask_token_frac, mask_id,
                              np.where(u < mask_token_frac + random_token_frac, random_tokens, tokens[chosen]))
    weights[chosen] = 1.0
    return inputs, weights


def train_iterator(source: MlmSource, *, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1, replay=None) -> grain.DatasetIterator:
    """Endless shuffled batches (the same grain recipe as pipeline.train_iterator; `replay`: old rows mixed in)."""
    return pipeline.shuffled_batches(source, global_batch=global_batch, seed=seed, process_index=process_index,
                                     process_count=process_count, replay=replay,
                                     what=f"MLM examples of data.seq_len={source.seq_len}")


def eval_batches(source: MlmSource, *, batch_size: int, max_batches: int) -> list[dict]:
    """The first `max_batches` batches (0 = all) in order; the last padded with all-zero-weight rows."""
    if len(source) == 0:
        raise DataError("the validation split gives no MLM examples; raise data.val_fraction")
    return pipeline.padded_batches(source, batch_size=batch_size, max_batches=max_batches)
