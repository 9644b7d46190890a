"""Replay for continual learning: the old domain's rows mixed into every training batch at a ratio.

`Replay(source, ratio, seed)` names a random-access source of the old domain's rows (built the way the
mode builds its own rows, with the run's tokenizer) and the share `ratio` of rows drawn from it.
`Replay.mixed_with(new_ds)` is grain's weighted mixing (`grain.MapDataset.mix`) of two endless
shuffled row sequences, before batching (data/pipeline.shuffled_rows): grain's deterministic
proportional selection puts round(k * ratio) (+-1) old rows in every k consecutive rows, so every
global batch has the ratio. The result is a MapDataset indexed by position: the iterator state is
still one integer, saved and resumed bit-exactly with every checkpoint (pipeline.shuffled_batches).

`old_text_stream` reads old text (a file, directory or JSONL, or a prepared dataset) with the run's
tokenizer; plain text is split as data.split / data.val_fraction split it, and only the training
share is kept, so the old domain's validation documents are never replayed.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from data import pipeline, prepared, sources
from data.sources import DataError
from data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Replay:
    source: object  # random-access old-domain rows (the same keys and shapes as the new rows)
    ratio: float  # share of rows drawn from `source`, in (0, 1)
    seed: int  # shuffle seed of the old rows

    def mixed_with(self, new_ds: grain.MapDataset) -> grain.MapDataset:
        """`new_ds` (endless shuffled rows) with this replay's old rows (shuffled, endless) interleaved at
        `ratio` by grain's deterministic proportional selection; batching and the per-process split follow."""
        check_ratio(self.ratio)
        if not 0.0 < float(self.ratio):
            raise ValueError("a Replay needs continual.replay_ratio > 0 (0 = no replay: pass replay=None)")
        if len(self.source) == 0:
            raise DataError("continual.replay_path gives no training rows of the old domain")
        old_ds = pipeline.shuffled_rows(self.source, self.seed)
        return grain.MapDataset.mix([new_ds, old_ds], weights=[1.0 - self.ratio, self.ratio])


def check_ratio(ratio: float) -> None:
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"continual.replay_ratio={ratio!r} must be in [0, 1) (the share of each batch drawn "
                         f"from the old data; 0 = no replay)")


def first_rows(source, n: int, seed: int) -> list[dict]:
    """The first `n` rows of `source` in the shuffled order the replay starts with (EWC's Fisher batches);
    an error naming the count when the source has fewer rows."""
    if len(source) < n:
        raise DataError(f"the old data (continual.replay_path) gives {len(source)} rows, fewer than the "
                        f"{n} that continual.fisher_batches x the micro-batch need")
    ds = grain.MapDataset.source(source).shuffle(seed=seed)
    return [ds[i] for i in range(n)]


def stack(rows: list[dict], batch_size: int) -> list[dict]:
    """Rows -> batches of `batch_size` (every key stacked; len(rows) a multiple of batch_size)."""
    return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]


def old_text_stream(path: str, tok: Tokenizer, *, text_field: str, split: str,
                    val_fraction: float) -> pipeline.TokenStream:
    """The old domain's training text as the run's tokens: a prepared dataset's 'train' split (its tokenizer
    must be the run's), or the training share of a text file / directory / JSONL (data.split, data.val_fraction)."""
    if prepared.is_prepared(path):
        data_tok = prepared.load_tokenizer_checked(path)
        if data_tok.to_json() != tok.to_json():
            raise DataError(f"continual.replay_path={path!r} is a prepared dataset tokenized with a "
                            f"{data_tok.kind!r} tokenizer ({data_tok.vocab_size} ids), not the run's "
                            f"{tok.kind!r} ({tok.vocab_size} ids)")
        return prepared.split_stream(path, "train", tok.eos_id)
    docs, _ = sources.read_documents(path, text_field)
    train, _ = pipeline.split_documents([d.text for d in docs], split, val_fraction)
    return pipeline.tokenize_stream(train, tok)
