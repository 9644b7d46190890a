"""Extractive QA data: SQuAD-style JSONL -> windowed `<cls> question <sep> context <sep>` features.

Records: {"id"?, "question", "context", "answers"} with answers either as SQuAD/HF columns
{"text": [...], "answer_start": [...]} or as a list [{"text", "answer_start"}, ...]; each answer
must sit at context[answer_start:answer_start + len(text)] (data/formats.py checks it). A record
without answers is an unanswerable question (SQuAD 2.0): read only with `unanswerable` (config
qa.unanswerable), else a bad record ('qa: no answer'). Under `strict` the first bad record raises
naming its file and line; otherwise it is counted (stats.skipped) and skipped. A record without "id"
is named by its file:line.

Features: the question is cut to `max_query_len` tokens (counted in `QAFeatures.truncation`,
logged per split by the input builder); a context longer than the room left in `seq_len` is
covered by sliding windows whose consecutive context spans share `doc_stride` tokens (the
overlap, as Hugging Face's `stride`; each window moves by room - doc_stride).
Token types are 0 for `<cls> question <sep>` and 1 for `context <sep>`; padding has segment id 0.
`start`/`end` label the first answer's first and last token when the whole answer lies inside the
window, else 0 (the <cls> position: "not in this window"; an unanswerable question's every window).
Every token keeps the character span of the context it stands for (`offsets`, -1 outside the
context), so a predicted token span maps back to a context substring (data/qa_eval.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import formats
from data.sources import DataError, ReadStats, Source, source_records
from data.tokenizer import Tokenizer
from data.truncation import Truncation

ARRAY_KEYS = ("inputs", "positions", "segment_ids", "token_types", "start", "end", "weight")


@dataclasses.dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # (text, character start in context)


def as_columns(record):
    """A list-of-answers record -> the {"text": [...], "answer_start": [...]} form (others unchanged)."""
    answers = record.get("answers") if isinstance(record, dict) else None
    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
        return record
    if not all("text" in a and "answer_start" in a for a in answers):
        raise formats.FormatError("missing field", "every answers[i] needs 'text' and 'answer_start'")
    return dict(record, answers={"text": [a["text"] for a in answers],
                                 "answer_start": [a["answer_start"] for a in answers]})


def _example(where: str, record, unanswerable: bool) -> QAExample:
    r = formats.validate(as_columns(record), "qa")
    if not r["answers"]["text"] and not unanswerable:
        raise formats.FormatError("no answer", "'answers' is empty: an unanswerable question (SQuAD 2.0); "
                                  "--config.qa.unanswerable=True trains and scores them")
    rid = r.get("id", where)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise formats.FormatError("wrong type", f"'id' is {type(rid).__name__}, expected str or int")
    return QAExample(str(rid), r["question"], r["context"],
                     tuple(zip(r["answers"]["text"], r["answers"]["answer_start"])))


def read_split(path: str, *, strict: bool, unanswerable: bool = False) -> tuple[list[QAExample], ReadStats]:
    """The valid examples of a QA JSONL file/directory; bad records raise (strict) or are counted;
    `unanswerable`: records without answers are examples too (else bad records)."""
    stats = ReadStats()
    examples, seen = [], set()
    for where, record in source_records(Source(kind="files", path=path), stats, strict=strict):
        try:
            ex = _example(where, record, unanswerable)
            if ex.id in seen:
                raise formats.FormatError("duplicate id", f"id {ex.id!r} occurs earlier in {path!r}")
        except formats.FormatError as e:
            if strict:
                raise formats.FormatError(e.reason, e.detail, where) from None
            stats.skip(f"qa: {e.reason}")
            continue
        seen.add(ex.id)
        stats.documents += 1
        examples.append(ex)
    if not examples:
        raise DataError(f"{path!r}: no valid QA records ({stats.summary()})")
    return examples, stats


def context_room(seq_len: int, max_query_len: int, doc_stride: int) -> int:
    """Context tokens per window for the longest question; raises if the settings leave none."""
    room = seq_len - max_query_len - 3  # <cls>, <sep>, <sep>
    if max_query_len < 1 or room < 1:
        raise DataError(f"data.seq_len={seq_len} with qa.max_query_len={max_query_len} leaves {room} "
                        f"context tokens per window (needs >= 1 and max_query_len >= 1)")
    if not 0 <= doc_stride < room:
        raise DataError(f"qa.doc_stride={doc_stride} must be in [0, {room}): the context tokens per window "
                        f"(data.seq_len={seq_len} - qa.max_query_len={max_query_len} - 3)")
    return room


def answer_tokens(offsets_Nx2: np.ndarray, start: int, text: str) -> tuple[int, int] | None:
    """First and last context token overlapping context[start:start+len(text)] (None: no token does)."""
    end = start + len(text)
    hits = np.flatnonzero((offsets_Nx2[:, 1] > start) & (offsets_Nx2[:, 0] < end))
    return (int(hits[0]), int(hits[-1])) if len(hits) else None


def window_starts(n_context: int, room: int, doc_stride: int) -> list[int]:
    """Start token of each window over n_context tokens: room tokens each, consecutive ones sharing doc_stride."""
    starts = [0]
    while starts[-1] + room < n_context:
        starts.append(starts[-1] + room - doc_stride)
    return starts


def encode_example(tok: Tokenizer, ex: QAExample, *, seq_len: int, max_query_len: int,
                   doc_stride: int) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """One example -> its windows: (feature arrays, offsets [seq_len, 2] into ex.context, -1 outside it)."""
    q_ids = tok.encode(ex.question).astype(np.int32)[:max_query_len]
    c_ids, c_off = tok.encode_offsets(ex.context)
    room = seq_len - len(q_ids) - 3
    context_room(seq_len, max_query_len, doc_stride)
    span = answer_tokens(c_off, ex.answers[0][1], ex.answers[0][0]) if ex.answers else None
    cls, sep = (np.array([tok.special_id(t)], np.int32) for t in ("<cls>", "<sep>"))
    head = np.concatenate([cls, q_ids, sep])
    features, offsets = [], []
    for ws in window_starts(len(c_ids), room, doc_stride):
        we = min(ws + room, len(c_ids))
        tokens = np.concatenate([head, c_ids[ws:we], sep])
        n = len(tokens)
        f = {"inputs": np.full(seq_len, tok.pad_id, np.int32), "positions": np.arange(seq_len, dtype=np.int32),
             "segment_ids": np.zeros(seq_len, np.int32), "token_types": np.zeros(seq_len, np.int32),
             "start": np.int32(0), "end": np.int32(0), "weight": np.float32(1.0)}
        f["inputs"][:n] = tokens
        f["segment_ids"][:n] = 1
        f["token_types"][len(head):n] = 1
        if span is not None and ws <= span[0] and span[1] < we:
            f["start"], f["end"] = np.int32(len(head) + span[0] - ws), np.int32(len(head) + span[1] - ws)
        off = np.full((seq_len, 2), -1, np.int32)
        off[len(head):len(head) + we - ws] = c_off[ws:we]
        features.append(f)
        offsets.append(off)
    return features, offsets


@dataclasses.dataclass
class QAFeatures:
    """All windows of a split (a grain data source): stacked arrays, their example and char offsets."""
    arrays: dict[str, np.ndarray]  # ARRAY_KEYS -> [N, seq_len] or [N]
    example_index: np.ndarray  # [N] index into `examples`
    offsets: np.ndarray  # [N, seq_len, 2] character spans in the example's context; -1 outside it
    examples: list[QAExample]
    truncation: Truncation | None = None  # questions cut to qa.max_query_len tokens (contexts are windowed)
    unplaced: int = 0  # answered examples whose answer no window holds whole (longer than a window's room, or cut)
    answer_lengths: list[int] = dataclasses.field(default_factory=list)  # tokens of each placed answer

    def unreachable(self, max_answer_len: int) -> tuple[int, int]:
        """(answers no window holds, answers longer than the eval's longest span): neither can be predicted."""
        return self.unplaced, sum(n > max_answer_len for n in self.answer_lengths)

    def __len__(self) -> int:
        return len(self.example_index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return {k: v[i] for k, v in self.arrays.items()}


def make_features(examples: list[QAExample], tok: Tokenizer, *, seq_len: int, max_query_len: int,
                  doc_stride: int) -> QAFeatures:
    context_room(seq_len, max_query_len, doc_stride)
    truncation = Truncation("questions", max_query_len)
    rows, offsets, owner, unplaced, lengths = [], [], [], 0, []
    for i, ex in enumerate(examples):
        truncation.add(len(tok.encode(ex.question)))
        feats, offs = encode_example(tok, ex, seq_len=seq_len, max_query_len=max_query_len, doc_stride=doc_stride)
        rows += feats
        offsets += offs
        owner += [i] * len(feats)
        if not ex.answers:  # unanswerable: <cls> everywhere is its label
            continue
        placed = [f for f in feats if f["start"] > 0]  # 0 is <cls>: "not in this window"
        if placed:
            lengths.append(int(placed[0]["end"] - placed[0]["start"]) + 1)
        else:
            unplaced += 1
    arrays = {k: np.stack([r[k] for r in rows]) for k in ARRAY_KEYS}
    return QAFeatures(arrays, np.array(owner, np.int32), np.stack(offsets), list(examples), truncation, unplaced,
                      lengths)
