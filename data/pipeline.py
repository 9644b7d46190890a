"""Input pipeline: split documents -> tokenize -> pack into windows -> grain shuffle/batch/shard.

Packing: each split is one token stream (every document ends in <eos>) with a segment id per
document. Window i holds tokens [i*L, i*L + L] (L+1 tokens -> inputs and shifted targets).
A window may hold the tail of one document and the head of the next: `segment_ids` keep
attention inside a document, `positions` restart at each document start, and `weights`
zero the one target that would cross a document boundary. Nothing is padded or dropped
except the final partial window.

The train iterator is a grain dataset (shuffled anew every epoch; each process reads its own
contiguous block of every global batch, so the batches do not depend on the process count); its
state (`get_state`/`set_state`) is saved with every checkpoint, so resume continues with the
identical next batch.
"""

from __future__ import annotations

import dataclasses
import hashlib

import grain
import numpy as np

from data.sources import DataError
from data.tokenizer import Tokenizer


def hash_unit(text: str) -> float:
    """Deterministic value in [0, 1) from the document text (stable across runs/machines)."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def split_documents(texts: list[str], mode: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """'hash': whole documents by content hash; 'tail': the last fraction of every document."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    if mode == "hash":
        train, val = [], []
        for t in texts:
            (val if hash_unit(t) < val_fraction else train).append(t)
    elif mode == "tail":
        cuts = [int(len(t) * (1.0 - val_fraction)) for t in texts]
        train = [t[:c] for t, c in zip(texts, cuts) if t[:c]]
        val = [t[c:] for t, c in zip(texts, cuts) if t[c:]]
    else:
        raise DataError(f"data.split={mode!r}: expected 'hash' or 'tail'")
    if not train or not val:
        raise DataError(
            f"data.split={mode!r} with val_fraction={val_fraction} over {len(texts)} documents gave "
            f"{len(train)} train and {len(val)} val documents; use more documents or data.split='tail'")
    return train, val


@dataclasses.dataclass
class TokenStream:
    tokens: np.ndarray  # int32 [N]
    segments: np.ndarray  # int32 [N], 1-based document index

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_stream(texts: list[str], tokenizer: Tokenizer) -> TokenStream:
    pieces, segs = [], []
    eos = np.array([tokenizer.eos_id], np.int32)
    for i, text in enumerate(texts):
        ids = np.concatenate([tokenizer.encode(text), eos])
        pieces.append(ids)
        segs.append(np.full(len(ids), i + 1, np.int32))
    return TokenStream(np.concatenate(pieces).astype(np.int32), np.concatenate(segs))


def pack_window(tokens: np.ndarray, segments: np.ndarray) -> dict[str, np.ndarray]:
    """L+1 tokens -> one training example of length L."""
    seg_in = segments[:-1]
    length = len(seg_in)
    idx = np.arange(length, dtype=np.int32)
    starts = np.ones(length, bool)
    starts[1:] = seg_in[1:] != seg_in[:-1]
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "positions": positions.astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "weights": (segments[1:] == seg_in).astype(np.float32),
    }


class WindowSource:
    """Random-access packed windows over a token stream (a grain data source)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self._n = max(0, (len(stream) - 1) // seq_len)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        a, b = i * self.seq_len, (i + 1) * self.seq_len + 1
        return pack_window(self.stream.tokens[a:b], self.stream.segments[a:b])


def train_iterator(stream: TokenStream, *, seq_len: int, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1, replay=None) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's share of `global_batch` windows (`replay`: shuffled_rows)."""
    source = WindowSource(stream, seq_len)
    if len(source) < global_batch:
        raise DataError(f"the training split has {len(stream)} tokens = {len(source)} windows of "
                        f"data.seq_len={seq_len}, fewer than data.batch_size={global_batch}")
    if global_batch % process_count:
        raise DataError(f"data.batch_size={global_batch} is not divisible by {process_count} processes")
    return _host_batches(shuffled_rows(source, seed, replay), global_batch, process_index, process_count)


def shuffled_rows(source, seed: int, replay=None) -> grain.MapDataset:
    """Endless rows of `source`, shuffled anew every epoch; `replay` (a data/mixture.Replay): the old domain's
    rows mixed in at its ratio (continual learning)."""
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    return ds if replay is None else replay.mixed_with(ds)


def _host_batches(ds: grain.MapDataset, global_batch: int, process_index: int,
                  process_count: int) -> grain.DatasetIterator:
    """Global batch b is examples [b * global_batch, (b + 1) * global_batch) of `ds` for any process count:
    process p reads only its contiguous block p of each (block k of size global_batch / process_count is
    batch k // process_count's part k % process_count). The iterator state (the batch index) is the same in
    every process and for every process count, so a checkpoint restores under another count."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process block {process_index} is not in [0, {process_count})")
    ds = ds.batch(global_batch // process_count, drop_remainder=True)[process_index::process_count]
    return iter(ds.to_iter_dataset())


def shuffled_batches(source, *, global_batch: int, seed: int, what: str, process_index: int = 0,
                     process_count: int = 1, replay=None) -> grain.DatasetIterator:
    """Endless shuffled batches over any random-access source of example dicts (MLM, classification):
    the same grain recipe as train_iterator, so the iterator state checkpoints the same way."""
    if len(source) < global_batch:
        raise DataError(f"the training split gives {len(source)} {what}, fewer than data.batch_size={global_batch}")
    if global_batch % process_count:
        raise DataError(f"data.batch_size={global_batch} is not divisible by {process_count} processes")
    return _host_batches(shuffled_rows(source, seed, replay), global_batch, process_index, process_count)


def eval_batches(stream: TokenStream, *, seq_len: int, batch_size: int, max_batches: int) -> list[dict]:
    """The first `max_batches` batches (0 = all) of the split's windows, in order; the last one
    padded with zero-weight rows. A split shorter than one window is an error naming its size."""
    source = WindowSource(stream, seq_len)
    if len(source) == 0:
        raise DataError(f"the validation split has {len(stream)} tokens, less than one window of "
                        f"data.seq_len={seq_len}; lower seq_len or raise data.val_fraction")
    return padded_batches(source, batch_size=batch_size, max_batches=max_batches)


def padded_batches(source, *, batch_size: int, max_batches: int) -> list[dict]:
    """The first `max_batches` batches (0 = all) of a random-access source of example dicts, in
    order; the last one padded with all-zero rows (zero weight, segment id 0): every mode's eval set."""
    n = len(source) if max_batches <= 0 else min(len(source), max_batches * batch_size)
    rows = [source[i] for i in range(n)]
    while rows and len(rows) % batch_size:
        rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
    return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]
