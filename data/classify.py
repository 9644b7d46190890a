"""Sequence classification data: JSONL {"text", "label"} (+ optional "text_pair") -> fixed-length examples.

Encoders ('first' pooling): <cls> text <sep> [text_pair <sep>], token types 0 then 1.
Decoders ('last' pooling):  text [<sep> text_pair] <eos>, pooled at the last non-pad token.
Pairs are truncated longest-first to fit `seq_len`; the source counts the records that were cut
and their untruncated lengths (`ClassifySource.truncation`, logged per split by the input builder).
The label vocabulary is built from the training split (sorted: ints first, then strings) and
saved with the run (WORKDIR/labels.json).
Records are validated by data/formats.py: under `strict` the first bad record raises naming
its file and line; otherwise it is counted (stats.skipped) and skipped. A validation label
never seen in training is handled the same way ('unknown label'). A label of -1 is Hugging Face
datasets' "no label" (SNLI's unlabelled pairs, every GLUE test split; the string "-1" too, as a CSV
holds it): such records are left out and counted ('unlabelled (label -1)'), unless
classify.minus_one_unlabelled=False makes -1 a class.
"""

from __future__ import annotations

import json

import numpy as np

from data import formats
from data.pipeline import padded_batches
from data.sources import DataError, ReadStats
from data.tokenizer import Tokenizer
from data.truncation import Truncation


UNLABELLED = "unlabelled (label -1)"


def read_split(path: str, *, strict: bool, fields: dict[str, str] | None = None, minus_one_unlabelled: bool = True
               ) -> tuple[list[tuple[str, dict]], ReadStats]:
    """(where, record) pairs of a classification JSONL file/directory, validated (`fields`: field_names);
    records labelled -1 left out and counted when `minus_one_unlabelled` (an error when that is all of them)."""
    records, stats = formats.read_split(path, "classification", strict=strict, fields=fields)
    if not minus_one_unlabelled:
        return records, stats
    kept = [(w, r) for w, r in records if not ((type(r["label"]) is int and r["label"] == -1) or r["label"] == "-1")]
    for _ in range(len(records) - len(kept)):
        stats.skip(UNLABELLED)
    if not kept:
        raise DataError(f"{path!r}: every record has label -1, Hugging Face datasets' 'no label' (a test split "
                        f"without its labels?); --config.classify.minus_one_unlabelled=False reads -1 as a class")
    return kept, stats


def read_configured(path: str, section) -> tuple[list[tuple[str, dict]], ReadStats]:
    """read_split as the config's classify section says (strict, field names, label -1)."""
    return read_split(path, strict=section.strict, fields=field_names(section),
                      minus_one_unlabelled=section.minus_one_unlabelled)


def field_names(section) -> dict[str, str]:
    """The data's names for "text", "text_pair" and "label" (config classify.text_field, .text_pair_field,
    .label_field; GLUE's SST-2: sentence / - / label, MNLI: premise / hypothesis / label)."""
    return {"text": section.text_field, "text_pair": section.text_pair_field, "label": section.label_field}


def _label_key(label):
    return (isinstance(label, str), label if isinstance(label, int) else 0, str(label))


def build_labels(records) -> list:
    return sorted({r["label"] for _, r in records}, key=_label_key)


def save_labels(labels: list, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"labels": labels}, f, indent=1)


def load_labels(path: str) -> list:
    with open(path) as f:
        return json.load(f)["labels"]


def token_ids(tok: Tokenizer, text: str, pair: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The record's text (and text_pair) as token ids, before any truncation."""
    return tok.encode(text).astype(np.int32), None if pair is None else tok.encode(pair).astype(np.int32)


def _overhead(pool: str, pair: bool) -> int:
    """Special tokens around the text: <cls> text <sep> [pair <sep>] or text [<sep> pair] <eos>."""
    return (2 if pool == "first" else 1) + (1 if pair else 0)


def full_length(a: np.ndarray, b: np.ndarray | None, pool: str) -> int:
    """Tokens the example would take untruncated: text (+ pair) and the special tokens around them."""
    return len(a) + (0 if b is None else len(b)) + _overhead(pool, b is not None)


def encode_example(tok: Tokenizer, text: str, pair: str | None, seq_len: int, pool: str) -> dict[str, np.ndarray]:
    return layout(tok, *token_ids(tok, text, pair), seq_len, pool)


def layout(tok: Tokenizer, a: np.ndarray, b: np.ndarray | None, seq_len: int, pool: str) -> dict[str, np.ndarray]:
    """Token ids of text (+ pair) -> one fixed-length example, the pair cut longest-first to fit."""
    budget = seq_len - _overhead(pool, b is not None)
    if budget < (2 if b is not None else 1):
        raise DataError(f"data.seq_len={seq_len} leaves no room for text")
    la, lb = len(a), (0 if b is None else len(b))
    while la + lb > budget:  # longest first
        if la >= lb:
            la -= 1
        else:
            lb -= 1
    cls, sep, eos = (np.array([tok.special_id(t)], np.int32) for t in ("<cls>", "<sep>", "<eos>"))
    if pool == "first":
        first = [cls, a[:la], sep]
        second = [] if b is None else [b[:lb], sep]
    else:
        first = [a[:la]]
        second = [eos] if b is None else [sep, b[:lb], eos]
    n_first = sum(len(x) for x in first)
    tokens = np.concatenate(first + second)
    n = len(tokens)
    out = {"inputs": np.full(seq_len, tok.pad_id, np.int32), "positions": np.arange(seq_len, dtype=np.int32),
           "segment_ids": np.zeros(seq_len, np.int32), "token_types": np.zeros(seq_len, np.int32)}
    out["inputs"][:n] = tokens
    out["segment_ids"][:n] = 1
    out["token_types"][n_first:n] = 1
    return out


class ClassifySource:
    """Random-access encoded examples (a grain data source); all arrays precomputed. `truncation`:
    how many records were cut to seq_len tokens (and their untruncated lengths)."""

    def __init__(self, examples: list[dict], labels: np.ndarray, truncation: Truncation | None = None):
        self.examples, self.labels = examples, labels
        self.truncation = truncation

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return dict(self.examples[i], label=np.int32(self.labels[i]), weight=np.float32(1.0))


def label_index(labels: list) -> dict:
    """(type, label) -> class id: labels 1, 1.0, "1" and True stay distinct."""
    return {(type(lab), lab): i for i, lab in enumerate(labels)}


def label_key(label) -> tuple:
    return type(label), label


def _same_text(label, labels: list) -> str:
    """A hint when `label` is a training label written as another type (1 against a CSV's '1')."""
    twin = next((lab for lab in labels if str(lab) == str(label)), None)
    if twin is None:
        return ""
    return (f": the training data's label {twin!r} is a {type(twin).__name__}, this one a {type(label).__name__} "
            f"(a CSV / TSV file's values are text); labels of different types are different classes, so write "
            f"them one way in every file")


def make_source(records, tok: Tokenizer, labels: list, seq_len: int, pool: str, *, strict: bool,
                stats: ReadStats) -> ClassifySource:
    """Encode records; a label outside `labels` raises (strict, naming file:line) or is counted.
    Records longer than seq_len are cut (longest part first) and counted in the source's `truncation`."""
    index = label_index(labels)
    truncation = Truncation("records", seq_len)
    examples, ids = [], []
    for where, r in records:
        key = label_key(r["label"])
        if key not in index:
            if strict:
                raise DataError(f"{where}: unknown label {r['label']!r} (training labels: {labels})"
                                f"{_same_text(r['label'], labels)}")
            stats.skip("unknown label")
            continue
        a, b = token_ids(tok, r["text"], r.get("text_pair"))
        truncation.add(full_length(a, b, pool))
        examples.append(layout(tok, a, b, seq_len, pool))
        ids.append(index[key])
    if not examples:
        raise DataError(f"no usable classification records ({stats.summary()})")
    return ClassifySource(examples, np.array(ids, np.int32), truncation)


def eval_batches(source: ClassifySource, *, batch_size: int, max_batches: int) -> list[dict]:
    """The first `max_batches` batches (0 = all) in order; the last padded with zero-weight rows."""
    return padded_batches(source, batch_size=batch_size, max_batches=max_batches)
