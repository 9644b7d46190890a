"""Preference pairs for reward modeling and DPO: {"prompt", "chosen", "rejected"} -> paired rows.

Each side is the two-turn chat `user: prompt -> assistant: response` rendered with the SFT
template (data/chat.py), so a reward model or DPO policy warm-started from an SFT run reads
exactly what it was trained on: `<|user|> prompt <|end|> <|assistant|> response <|end|>`. A prompt
given as a list of messages (data/formats: a conversation ending with a user turn) is rendered as
that conversation, the side as the assistant's next turn; only that turn is scored.

An example holds, for side in ('chosen', 'rejected'), the keys of data/pipeline.pack_window
prefixed `chosen_` / `rejected_` (inputs, targets, positions, segment_ids, weights): one
conversation per row, right-padded (segment id 0), weights = 1 on the response tokens and their
closing <|end|> as targets (the tokens whose log-probs DPO sums). Plus `margin` (the record's
optional numeric "margin" field, else 0; Llama 2's reward-model margin) and `weight` (1; eval
padding rows get 0). The last real token of a row (the response's closing <|end|>) is where a
reward head reads.

Too long (a side over seq_len tokens): `too_long='drop'` skips the pair; 'truncate' keeps the first
seq_len tokens of each side (the response's tail is lost), and drops the pair if either side has no
response token left. Both are counted under their reason. seq_len, not seq_len + 1: a row's last
real INPUT must be the side's last token (its <|end|> when whole), where the reward head reads.
"""

from __future__ import annotations

import numpy as np

from data import chat, formats
from data.pipeline import pack_window
from data.sources import ReadStats
from data.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")
TOO_LONG = ("truncate", "drop")


def prompt_messages(record: dict) -> list[dict]:
    """The conversation a pair answers: one user turn for a string prompt, else the prompt's messages."""
    prompt = record["prompt"]
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def conversation(record: dict, side: str) -> dict:
    """The chat record of one side of a preference record (extra fields dropped)."""
    return {"messages": prompt_messages(record) + [{"role": "assistant", "content": formats.reply_text(record[side])}]}


def prompt_ids(record: dict, tok: Tokenizer) -> np.ndarray:
    """The prompt as a generation prompt (ends with <|assistant|>): what a policy continues."""
    return chat.render_prompt(prompt_messages(record), tok)


def render_side(record: dict, side: str, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss mask) of one side: the conversation + the side as the assistant's reply; the mask is 1 on
    that reply and its closing <|end|> only (a conversational prompt's earlier assistant turns are context)."""
    ids, mask = chat.render(conversation(record, side), tok)
    mask[:len(prompt_ids(record, tok))] = 0.0
    return ids, mask


def _side_row(ids: np.ndarray, mask: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    width = seq_len + 1
    n = len(ids)
    tokens = np.concatenate([ids, np.full(width - n, pad_id, np.int32)]).astype(np.int32)
    segs = np.concatenate([np.ones(n, np.int32), np.zeros(width - n, np.int32)])
    row = pack_window(tokens, segs)
    row["weights"] = row["weights"] * np.concatenate([mask, np.zeros(width - n, np.float32)])[1:]
    return row


def margin_of(record: dict) -> float:
    m = record.get("margin", 0.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m):
        raise ValueError(f"margin={m!r}: expected a finite number")
    return float(m)


def render_pair(record: dict, tok: Tokenizer, *, seq_len: int, too_long: str) -> tuple[dict | None, str]:
    """One preference record -> (example, 'rendered' | 'truncated') or (None, the reason it was dropped)."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r}: expected one of {TOO_LONG}")
    example, status, kept = {}, "rendered", []
    for side in SIDES:
        ids, mask = render_side(record, side, tok)
        if len(ids) > seq_len:
            if too_long == "drop":
                return None, "too long"
            ids, mask = ids[:seq_len], mask[:seq_len]
            status = "truncated"
            if not mask[1:].any():
                return None, "no response tokens after truncation"
        kept.append(ids)
        for k, v in _side_row(ids, mask, seq_len, tok.pad_id).items():
            example[f"{side}_{k}"] = v
    if status == "truncated" and np.array_equal(kept[0], kept[1]):  # they differed only past the cut
        return None, "sides equal after truncation"
    example["margin"] = np.float32(margin_of(record))
    example["weight"] = np.float32(1.0)
    return example, status


def render_split(records: list[tuple[str, dict]], tok: Tokenizer, stats: ReadStats, *, seq_len: int,
                 too_long: str) -> list[dict]:
    """Examples of (where, record) pairs; drops are counted in `stats.skipped` by reason, pairs kept but cut
    to fit in `stats.truncated`. A bad margin raises naming the record."""
    if too_long not in TOO_LONG:  # a config value: named as such, not as a fault of the first record
        raise ValueError(f"pref.too_long={too_long!r}: expected one of {TOO_LONG}")
    out = []
    for where, record in records:
        try:
            example, status = render_pair(record, tok, seq_len=seq_len, too_long=too_long)
        except (ValueError, chat.ChatError) as e:
            raise ValueError(f"{where}: {e}") from None
        if status == "truncated":
            stats.truncated += 1
        elif status != "rendered":
            stats.skipped[status] = stats.skipped.get(status, 0) + 1
        if example is not None:
            out.append(example)
    return out


def as_chat_record(record: dict) -> dict:
    """A preference record as an SFT chat record (user prompt, assistant chosen) keeping "answer" and
    "kind": the exact-match evaluation's problems (data/sft.generation_problems) come from these."""
    out = conversation(record, "chosen")
    for key in ("answer", "kind"):
        if key in record:
            out[key] = record[key]
    return out


def trim_pairs(batch: dict, multiple: int = 32) -> dict:
    """A batch of pairs with the padding columns every row has cut off: width = the longest real side
    rounded up to `multiple` (at most the full width). Trailing padding is never attended nor scored, so
    the loss is the same; the step computes fewer positions, and only a few widths are ever compiled."""
    width = batch["chosen_inputs"].shape[1]
    longest = max(int(np.max(np.sum(batch[f"{side}_segment_ids"] != 0, axis=1))) for side in SIDES)
    keep = min(width, -(-max(longest, 1) // multiple) * multiple)
    if keep == width:
        return batch
    return {k: (v[:, :keep] if k.split("_", 1)[0] in SIDES and np.ndim(v) == 2 else v) for k, v in batch.items()}
