"""SFT data: chat JSONL -> rendered conversations -> packed rows; generation problems for exact match.

Records are `{"messages": [...]}` or `{"prompt", "response"}` (data/formats 'chat'), read from a
file, directory or glob. Under `strict` the first bad record raises naming its file and line;
otherwise every skipped record is counted under its reason (format errors from data/formats,
'too long' / 'truncated' / 'no assistant tokens after truncation' from data/chat).

Rows: `pack=True` lays whole conversations side by side (data/chat.pack_conversations: segment
ids stop attention and loss at conversation boundaries; only row tails are padding);
`pack=False` gives each conversation its own padded row. Either way a row is exactly what
data/pipeline.pack_window makes, so objectives.causal_lm trains on it.

Generation problems (`generation_problems`): the conversation up to its last assistant turn as
a prompt (data/chat.render_prompt, ending in <|assistant|>); the reference is the record's
`answer` field when it has one (a non-empty string or a number), else that turn's content; the
`kind` field, when present, groups the exact-match scores (README: "SFT task records").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import chat, formats
from data.sources import ReadStats
from data.tokenizer import Tokenizer


def read_split(path: str, *, strict: bool) -> tuple[list[tuple[str, dict]], ReadStats]:
    """(where, record) pairs of a chat JSONL file/directory/glob, validated."""
    return formats.read_split(path, "chat", strict=strict)


def render_split(records: list[tuple[str, dict]], tok: Tokenizer, stats: ReadStats, *, seq_len: int,
                 too_long: str, train_on: str, strict: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rendered (ids, loss mask) conversations; rejects are added to `stats.skipped`, kept ones cut to fit
    to `stats.truncated`."""
    rendered, counts = chat.render_records([r for _, r in records], tok, seq_len=seq_len, too_long=too_long,
                                           train_on=train_on, strict=strict, names=[w for w, _ in records])
    for reason, n in counts.items():
        if reason == "truncated":
            stats.truncated += n
        elif reason != "rendered":
            stats.skipped[reason] = stats.skipped.get(reason, 0) + n
    return rendered


def make_rows(rendered, *, seq_len: int, pad_id: int, pack: bool, fit: str) -> list[dict[str, np.ndarray]]:
    """Conversations -> training rows (pack_window examples of length seq_len)."""
    if pack:
        return list(chat.pack_conversations(rendered, seq_len, pad_id=pad_id, fit=fit))
    return [next(chat.pack_conversations([conv], seq_len, pad_id=pad_id)) for conv in rendered]


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: np.ndarray  # int32 ids ending in <|assistant|>
    reference: str  # the record's "answer" if it has one, else the last assistant turn's content
    kind: str  # the record's "kind" ('' if none)
    messages: tuple = ()  # the prompt's messages: the conversation before the last assistant turn
    record: dict = dataclasses.field(default_factory=dict)  # RL prompts: the record as read (a reward's `record`)


class Problems(list):
    """`generation_problems`' problems (a list) and `of`: how many of the records could have been one."""

    def __init__(self, problems, of: int):
        super().__init__(problems)
        self.of = of


def field_value(record: dict, field: str):
    """record[field]; a dotted field that is not a key of its own walks nested objects (verl's
    'reward_model.ground_truth'); None when absent."""
    if field in record or "." not in field:
        return record.get(field)
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def reference_answer(record: dict, messages: list[dict], field: str = "answer") -> str:
    """The record's "answer" field (or `field`, dotted for a nested one: a non-empty string, or a number as
    text) when it has one, else the last assistant turn's content: a task record may keep the checkable
    answer apart from a longer reply."""
    answer = field_value(record, field)
    if isinstance(answer, str) and answer.strip():
        return answer
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    return messages[-1]["content"]


def _final_turn_messages(record) -> list[dict] | None:
    """The record's messages when the last one is an assistant turn after at least one other; else None."""
    try:
        messages = chat.messages_of(record)
    except chat.ChatError:
        return None
    return messages if len(messages) >= 2 and messages[-1]["role"] == "assistant" else None


def generation_problems(records: list[tuple[str, dict]], tok: Tokenizer, limit: int) -> Problems:
    """Up to `limit` problems, in file order, from records whose last message is an assistant turn;
    `.of` counts all such records (the problems are the first `limit` of them)."""
    out, of = [], 0
    for _, record in records:
        messages = _final_turn_messages(record)
        if messages is None:
            continue
        if len(out) >= limit:
            of += 1
            continue
        try:
            prompt = chat.render_prompt(messages[:-1], tok)
        except chat.ChatError:
            continue
        of += 1
        kind = record.get("kind", "")
        out.append(Problem(prompt, reference_answer(record, messages), kind if isinstance(kind, str) else str(kind),
                           tuple(messages[:-1])))
    return Problems(out, of)
