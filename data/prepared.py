"""A prepared dataset directory (written by scripts/prepare_data.py): its layout, writer and readers.

    DIR/manifest.json                       what went in, what was removed and why, counts, config
    DIR/report.md                           the same for people
    DIR/tokenizer.json                      data/tokenizer.py spec ("kind": "bpe" | "byte" | "char")
    DIR/<split>-00000-of-00002.array_record one record per document: its token ids, little-endian
                                            manifest["token_dtype"] (uint16 when the vocabulary fits)
    DIR/records-<split>-...array_record     task datasets only: the validated JSON record of each
                                            document, aligned index by index with the token shards

Shards are ArrayRecord files (random access by index; `DocumentSource` is a grain data source).
`load_prepared(path)` gives what train.py needs: the tokenizer and the train/val token streams
(every document followed by <eos>, one segment id per document, exactly like
pipeline.tokenize_stream), so packing and document masking are unchanged.
"""

from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_data_source, array_record_module

from data.pipeline import TokenStream
from data.sources import DataError
from data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json, tokenizer_json_bytes

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val", "test")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access


def is_prepared(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(os.path.expanduser(path), MANIFEST))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{n:05d}.array_record" for i in range(n)]


def _shard_bounds(sizes: list[int], shard_bytes: int) -> list[int]:
    """Start index of each shard: consecutive documents, about `shard_bytes` each (none if no documents)."""
    if not sizes:
        return []
    starts, acc = [0], 0
    for i, size in enumerate(sizes):
        if acc and acc + size > shard_bytes:
            starts.append(i)
            acc = 0
        acc += size
    return starts


def write_records(out_dir: str, prefix: str, payloads: list[bytes], starts: list[int]) -> list[str]:
    names = shard_names(prefix, len(starts))
    ends = starts[1:] + [len(payloads)]
    for name, a, b in zip(names, starts, ends):
        writer = array_record_module.ArrayRecordWriter(os.path.join(out_dir, name), _WRITER_OPTIONS)
        for payload in payloads[a:b]:
            writer.write(payload)
        writer.close()
    return names


def write_split(out_dir: str, split: str, token_arrays: list[np.ndarray], dtype: np.dtype, shard_bytes: int,
                records: list[dict] | None = None) -> dict:
    """Token shards (and aligned record shards) of one split; returns its manifest entry."""
    payloads = [np.asarray(t).astype(dtype).tobytes() for t in token_arrays]
    starts = _shard_bounds([len(p) for p in payloads], shard_bytes)
    entry = {"documents": len(payloads), "shards": write_records(out_dir, split, payloads, starts)}
    if records is not None:
        encoded = [json.dumps(r, ensure_ascii=False, sort_keys=True).encode("utf-8") for r in records]
        entry["record_shards"] = write_records(out_dir, f"records-{split}", encoded, starts)
    return entry


def read_manifest(path: str) -> dict:
    path = os.path.expanduser(path)
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{os.path.join(path, MANIFEST)} cannot be read: {e}") from None


class DocumentSource:
    """Random access to the documents of one split: source[i] -> int32 token ids (a grain source)."""

    def __init__(self, path: str, split: str, records: bool = False):
        path = os.path.expanduser(path)
        manifest = read_manifest(path)
        if split not in manifest["splits"]:
            raise DataError(f"{path}: no split {split!r} (has {sorted(manifest['splits'])})")
        key = "record_shards" if records else "shards"
        if key not in manifest["splits"][split]:
            raise DataError(f"{path}: split {split!r} has no task records (a text dataset)")
        names = manifest["splits"][split][key]
        self._records = records
        self._dtype = np.dtype(manifest["token_dtype"])
        self._n = manifest["splits"][split]["documents"]
        self._source = (array_record_data_source.ArrayRecordDataSource([os.path.join(path, n) for n in names])
                        if self._n else None)

    def __len__(self) -> int:
        return self._n

    def _decode(self, raw: bytes):
        if self._records:
            return json.loads(raw.decode("utf-8"))
        return np.frombuffer(raw, self._dtype).astype(np.int32)

    def __getitem__(self, i: int):
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._decode(self._source[i])

    def read_all(self) -> list:
        if not self._n:
            return []
        return [self._decode(r) for r in self._source.__getitems__(list(range(self._n)))]


def split_stream(path: str, split: str, eos_id: int) -> TokenStream:
    """The split's documents as one stream, each followed by <eos>, segment ids 1..N."""
    docs = DocumentSource(path, split).read_all()
    if not docs:
        return TokenStream(np.zeros(0, np.int32), np.zeros(0, np.int32))
    lengths = np.array([len(d) + 1 for d in docs], np.int64)
    eos = np.array([eos_id], np.int32)
    tokens = np.concatenate([part for d in docs for part in (d, eos)])
    segments = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), lengths)
    return TokenStream(tokens.astype(np.int32), segments)


def load_tokenizer_checked(path: str) -> Tokenizer:
    path = os.path.expanduser(path)
    tok = load_tokenizer(os.path.join(path, TOKENIZER))
    manifest = read_manifest(path)
    if manifest["tokenizer"]["vocab_size"] != tok.vocab_size:
        raise DataError(f"{path}: tokenizer.json has {tok.vocab_size} ids but the manifest says "
                        f"{manifest['tokenizer']['vocab_size']}")
    return tok


def load_prepared(path: str) -> tuple[Tokenizer, TokenStream, TokenStream]:
    """(tokenizer, train stream, val stream) of a prepared dataset directory."""
    tok = load_tokenizer_checked(path)
    train = split_stream(path, "train", tok.eos_id)
    val = split_stream(path, "val", tok.eos_id)
    if not len(train) or not len(val):
        raise DataError(f"prepared dataset {path!r} has {len(train)} train and {len(val)} val tokens; "
                        f"both splits must be non-empty (see split.ratios in its manifest config)")
    return tok, train, val


def use_tokenizer_in_workdir(tok: Tokenizer, workdir: str, write: bool) -> None:
    """Save the dataset's tokenizer as WORKDIR/tokenizer.json; a run that already has a different
    one (another dataset or tokenizer) is refused."""
    path = os.path.join(workdir, TOKENIZER)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
        if tokenizer_from_json(existing).to_json() != tok.to_json():
            raise DataError(f"workdir {workdir!r} was trained with a different tokenizer "
                            f"({existing.get('kind')!r}) than this prepared dataset's ({tok.kind!r})")
        return
    if write:
        with open(path, "wb") as f:
            f.write(tokenizer_json_bytes(tok))
