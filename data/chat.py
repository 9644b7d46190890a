"""Chat template for SFT: render conversations to token ids + a loss mask, and pack them.

Template (version 1), with the reserved role tokens of data/tokenizer.SPECIALS:

    <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

No separators, no <bos>/<eos>: the role tokens delimit turns and the assistant's closing
<|end|> is the stop token at generation. A `{"prompt", "response"}` record is the two-turn
conversation user -> assistant; ShareGPT's `{"conversations": [{"from", "value"}]}`, TRL's `{"prompt",
"completion"}` and Alpaca's `{"instruction", "input", "output"}` records read as conversations too
(`chat_record`).

Loss mask (`train_on='assistant'`): 1 exactly on the tokens of each assistant's content and its
closing <|end|>; 0 on role tokens and on system/user turns, and on an assistant message with
`"weight": 0` (OpenAI's fine-tuning format: a turn kept as context, not learnt). `train_on='all'`: 1 on every token
(the conversation as plain language-model text). mask[i] says whether token i is a *target*;
when packing, the weight of input position j is mask[j + 1].

`template_spec()` is a JSON dict to store with a checkpoint; `render_prompt` uses the same
template and ends with <|assistant|>, so generation continues as the model was trained.

Packing (`pack_conversations`): whole conversations are laid next to each other in rows of
seq_len + 1 tokens (next-fit in order, or first-fit), never split; each row becomes one example with exactly the keys of data/pipeline.pack_window
(inputs/targets/positions/segment_ids/weights), so objectives.causal_lm trains on it unchanged:
segment ids keep attention inside a conversation, positions restart at each conversation, and
weights = shifted loss mask, zero across conversation boundaries. Only the tail of a row is
padding: segment id 0, weight 0.

Bad input (`render_records`): a record that is not a chat, has no assistant turn, an unknown
role, empty content, or (too_long='drop') more than seq_len + 1 tokens is counted under a named
reason and skipped (as is a system turn after the first, like data/formats); with strict=True it raises ValueError naming the record index.
too_long='truncate' keeps the first seq_len + 1 tokens (counted as 'truncated'), and drops the
record ('no assistant tokens after truncation') if no trained token remains.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, Iterator

import numpy as np

from data.pipeline import pack_window
from data.tokenizer import Tokenizer

TEMPLATE_VERSION = 1
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's name for the system turn (as scripts/serve.py reads it too)
END_TOKEN = "<|end|>"
TRAIN_ON = ("assistant", "all")
TOO_LONG = ("truncate", "drop")


class ChatError(ValueError):
    """A record the template cannot render; `reason` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def template_spec() -> dict:
    """JSON-serialisable description of the template, saved with a checkpoint."""
    return {"name": "lmstack-chat", "version": TEMPLATE_VERSION, "role_tokens": dict(ROLE_TOKENS),
            "end_token": END_TOKEN, "bos": None, "eos_after_conversation": False,
            "separator": "", "generation_prefix": ROLE_TOKENS["assistant"],
            "loss": "assistant content + its closing end token"}


def check_template_spec(spec: dict) -> None:
    """Raise if a checkpoint's stored template differs from this code's template."""
    if spec != template_spec():
        raise ValueError(f"chat template mismatch: checkpoint has {spec}, this code renders {template_spec()}")


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def chat_record(record):
    """Other common SFT shapes as a {"messages": [...]} record (a copy, other fields kept): ShareGPT's
    {"conversations": [{"from": "human" | "gpt" | "system", "value"}]}, TRL's {"prompt", "completion"}
    (texts, or lists of messages: the conversation so far and the assistant's turns) and Alpaca's
    {"instruction", "input"?, "output"} (the user turn is the instruction, then a blank line and the input
    when there is one), and the question/answer pairs of QUESTION_ANSWER (GSM8K, MATH, MetaMathQA). Anything
    else, the template's own shapes included, is returned as it is."""
    if not isinstance(record, dict) or "messages" in record:
        return record
    if isinstance(record.get("conversations"), list):  # ShareGPT: [{"from": "human" | "gpt" | "system", "value"}]
        turns = []
        for i, turn in enumerate(record["conversations"]):
            keys = next((k for k in (("from", "value"), ("role", "content")) if isinstance(turn, dict)
                         and all(x in turn for x in k)), None)
            if keys is None:
                raise ChatError("wrong type", f"conversations[{i}] is {turn!r:.80}, expected {{'from', 'value'}}")
            if turn[keys[0]] not in SHAREGPT_ROLES:
                raise ChatError("unknown role", f"conversations[{i}].{keys[0]}={turn[keys[0]]!r}, expected one of "
                                f"{tuple(SHAREGPT_ROLES)}")
            turns.append({"role": SHAREGPT_ROLES[turn[keys[0]]], "content": turn[keys[1]]})
        used = ("conversations",)
    elif "prompt" in record and "completion" in record and "response" not in record:
        prompt, completion = record["prompt"], record["completion"]
        turns = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + \
            (completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}])
        used = ("prompt", "completion")
    elif "instruction" in record and "output" in record:
        for field in ("instruction", "input", "output"):
            if not isinstance(record.get(field, ""), str):
                raise ChatError("wrong type", f"{field!r} is {type(record[field]).__name__}, expected a string")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input", "").strip() else "")
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        used = ("instruction", "input", "output")
    elif (pair := _question_answer(record)) is not None:
        turns = [{"role": "user", "content": record[pair[0]]}, {"role": "assistant", "content": str(record[pair[1]])}]
        used = pair
    else:
        return record
    return {**{k: v for k, v in record.items() if k not in used}, "messages": turns}


# Question/answer fields of public reasoning datasets, read as a user turn and the assistant's reply: GSM8K's
# question/answer ('... #### 72'), MATH's problem/solution ('... \\boxed{3}'), MetaMathQA's query/response.
QUESTION_ANSWER = (("question", "answer"), ("problem", "solution"), ("query", "response"))
# what a chat record without one of the shapes chat_record / messages_of read is told (data/formats too)
NO_MESSAGES = ("no 'messages' (or 'conversations', 'prompt' + 'response' / 'completion', 'instruction' + 'output', "
               "or " + ", ".join(f"'{q}' + '{a}'" for q, a in QUESTION_ANSWER) + ")")


def _question_answer(record: dict) -> tuple[str, str] | None:
    """The (question, answer) fields of a QUESTION_ANSWER record: a non-empty string question and a string or
    number answer, and no 'prompt' (the template's own shapes) or 'context' (a reading-comprehension record
    whose passage a chat would lose)."""
    if "prompt" in record or "context" in record:
        return None
    for q, a in QUESTION_ANSWER:
        question, answer = record.get(q), record.get(a)
        if isinstance(question, str) and question.strip() and (
                isinstance(answer, str) or (isinstance(answer, (int, float)) and not isinstance(answer, bool))):
            return q, a
    return None


_TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def transcript_messages(text) -> list[dict] | None:
    """Anthropic HH-RLHF's raw transcript text ('\\n\\nHuman: ...\\n\\nAssistant: ...', as in its JSONL files
    and in the prompts of DeepSpeed-Chat's Dahoas/rm-static) as messages, contents stripped; None for text
    that is not one (it must start with a 'Human:' turn and hold an 'Assistant:' one). A closing
    'Assistant:' with nothing after it is kept as an empty assistant turn (a prompt's cue to answer)."""
    if not isinstance(text, str):
        return None
    body = text.lstrip("\n")
    if not body.startswith("Human:") or "\n\nAssistant:" not in body:
        return None
    parts = _TRANSCRIPT_TURN.split(body)  # ['', 'Human', text, 'Assistant', text, ...]
    return [{"role": "user" if who == "Human" else "assistant", "content": content.strip()}
            for who, content in zip(parts[1::2], parts[2::2])]


def transcript_prompt(text) -> list[dict] | None:
    """A prompt that is a transcript ending in the empty 'Assistant:' cue (Dahoas/rm-static's) as the
    messages before the cue; None for any other prompt."""
    turns = transcript_messages(text)
    return turns[:-1] if turns and turns[-1] == {"role": "assistant", "content": ""} else None


def messages_of(record) -> list[dict]:
    """The message list of a {"messages": [...]} or {"prompt", "response"} record, or of a shape `chat_record`
    reads (checked)."""
    if not isinstance(record, dict):
        raise ChatError("not an object", f"record is {type(record).__name__}")
    record = chat_record(record)
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        turns = transcript_prompt(record["prompt"])  # a Dahoas/rm-static transcript: its turns, the reply stripped
        reply = record["response"].strip() if turns and isinstance(record["response"], str) else record["response"]
        messages = (turns or [{"role": "user", "content": record["prompt"]}]) + \
            [{"role": "assistant", "content": reply}]
    else:
        raise ChatError("missing field", NO_MESSAGES)
    return checked_messages(messages, "messages")


def checked_messages(messages, field: str, error: type = ChatError) -> list[dict]:
    """`messages` (the list in a record's `field`) with OpenAI's role names aliased, checked: a non-empty list
    of objects, each with a known role (a system turn only first), non-empty text content and, on an
    assistant message, a weight of 0 or 1 if any; else `error(reason, detail)` naming `field[i]` and the
    value. The one message check of the SFT reader (ChatError) and of data preparation (FormatError)."""
    if not isinstance(messages, list) or not messages:
        raise error("wrong type", f"'{field}' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise error("wrong type", f"{field}[{i}] is {type(m).__name__}, expected an object")
        m = dict(m, role=ROLE_ALIASES[m["role"]]) if m.get("role") in ROLE_ALIASES else m
        if m.get("role") not in ROLE_TOKENS:
            raise error("unknown role", f"{field}[{i}].role={m.get('role')!r}, expected one of {tuple(ROLE_TOKENS)}")
        if m["role"] == "system" and i:
            raise error("misplaced system", f"{field}[{i}] is a system message after the first turn")
        content = m.get("content")
        if not isinstance(content, str):
            raise error("wrong type", f"{field}[{i}].content is {type(content).__name__}, expected str")
        if not content.strip():
            raise error("empty content", f"{field}[{i}].content is empty: {content!r}")
        if bad_weight(m):
            raise error("bad weight", f"{field}[{i}].weight={m['weight']!r}: {WEIGHT_RULE}")
        out.append(m)
    return out


WEIGHT_RULE = "an assistant message's weight is 0 (not trained on) or 1 (OpenAI's fine-tuning format)"


def bad_weight(m: dict) -> bool:
    """Whether a message has a "weight" other than an assistant message's 0 or 1."""
    if "weight" not in m:
        return False
    return m.get("role") != "assistant" or isinstance(m["weight"], bool) or m["weight"] not in (0, 1)


def _render_messages(messages: list[dict], tokenizer: Tokenizer, train_on: str):
    end = tokenizer.special_id(END_TOKEN)
    ids, mask = [], []
    for m in messages:
        content = tokenizer.encode(m["content"]).astype(np.int32)
        trained = 1.0 if (train_on == "all" or (m["role"] == "assistant" and m.get("weight", 1) == 1)) else 0.0
        ids += [np.array([tokenizer.special_id(ROLE_TOKENS[m["role"]])], np.int32), content,
                np.array([end], np.int32)]
        mask += [np.array([1.0 if train_on == "all" else 0.0], np.float32),
                 np.full(len(content) + 1, trained, np.float32)]
    return np.concatenate(ids), np.concatenate(mask)


def render(record, tokenizer: Tokenizer, *, train_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
    """One chat record -> (ids int32 [N], loss_mask float32 [N]). Raises ChatError on bad input."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}: expected one of {TRAIN_ON}")
    messages = messages_of(record)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError("no assistant turn", f"roles {[m['role'] for m in messages]}")
    if train_on == "assistant" and not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        raise ChatError("no trained turn", "every assistant message has weight 0")
    return _render_messages(messages, tokenizer, train_on)


def render_prompt(messages: list[dict], tokenizer: Tokenizer) -> np.ndarray:
    """Prompt ids for generation: the conversation so far, then <|assistant|>. Generation stops at <|end|>."""
    messages = messages_of({"messages": messages})
    ids, _ = _render_messages(messages, tokenizer, "assistant")
    return np.concatenate([ids, np.array([tokenizer.special_id(ROLE_TOKENS["assistant"])], np.int32)])


def render_records(records: Iterable, tokenizer: Tokenizer, *, seq_len: int, too_long: str = "truncate",
                   train_on: str = "assistant", strict: bool = False, names=None):
    """Render many records -> (list of (ids, mask), Counter of reasons). A packed row holds
    seq_len + 1 tokens, so that is the longest conversation kept whole. `names[i]` (e.g.
    'file.jsonl:12') names record i in strict errors; default 'record i'."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r}: expected one of {TOO_LONG}")
    limit = seq_len + 1
    out, counts = [], collections.Counter()
    for index, record in enumerate(records):
        try:
            ids, mask = render(record, tokenizer, train_on=train_on)
            if len(ids) > limit:
                if too_long == "drop":
                    raise ChatError("too long", f"{len(ids)} tokens > seq_len + 1 = {limit}")
                ids, mask = ids[:limit], mask[:limit]
                if not mask[1:].any():
                    raise ChatError("no assistant tokens after truncation",
                                    f"{len(ids)} tokens kept of a longer conversation")
                counts["truncated"] += 1
        except ChatError as e:
            if strict:
                raise ValueError(f"{names[index] if names is not None else f'record {index}'}: {e}") from None
            counts[e.reason] += 1
            continue
        counts["rendered"] += 1
        out.append((ids, mask))
    return out, counts


FITS = ("next", "first")


def _row(convs, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """[(ids, mask), ...] that fit in `width` tokens -> one pack_window example; tail = padding."""
    n = sum(len(ids) for ids, _ in convs)
    tok = np.concatenate([ids for ids, _ in convs] + [np.full(width - n, pad_id, np.int32)]).astype(np.int32)
    seg = np.concatenate([np.full(len(ids), s + 1, np.int32) for s, (ids, _) in enumerate(convs)]
                         + [np.zeros(width - n, np.int32)])
    msk = np.concatenate([m for _, m in convs] + [np.zeros(width - n, np.float32)]).astype(np.float32)
    example = pack_window(tok, seg)
    example["weights"] = example["weights"] * msk[1:]
    return example


def pack_conversations(rendered: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, *, pad_id: int = 0,
                       fit: str = "next") -> Iterator[dict[str, np.ndarray]]:
    """(ids, mask) conversations -> examples of length seq_len, as data/pipeline.pack_window makes them.

    fit='next': streaming and order-preserving; a conversation that does not fit closes the row.
    fit='first': each conversation goes to the first row with room (reads all input first; rows
    come out in creation order, conversations inside a row in arrival order). Denser, most of all
    at short seq_len (README, Supervised fine-tuning and LoRA, has the fill rates).
    A conversation longer than seq_len + 1 tokens is an error (render_records truncates or drops)."""
    if fit not in FITS:
        raise ValueError(f"fit={fit!r}: expected one of {FITS}")
    width = seq_len + 1
    rows: list[list] = []
    room: list[int] = []
    for i, (ids, m) in enumerate(rendered):
        ids, m = np.asarray(ids, np.int32), np.asarray(m, np.float32)
        if len(ids) != len(m):
            raise ValueError(f"conversation {i}: {len(ids)} ids but {len(m)} mask values")
        if len(ids) > width:
            raise ValueError(f"conversation {i} has {len(ids)} tokens, more than seq_len + 1 = {width}; "
                             f"render with render_records(..., too_long='truncate'|'drop')")
        if fit == "next":
            if rows and room[-1] < len(ids):
                yield _row(rows.pop(), width, pad_id)
                room.pop()
            j = len(rows) - 1 if rows else -1
        else:
            fits = np.nonzero(np.asarray(room, np.int64) >= len(ids))[0]
            j = int(fits[0]) if len(fits) else -1
        if j < 0:
            rows.append([])
            room.append(width)
            j = len(rows) - 1
        rows[j].append((ids, m))
        room[j] -= len(ids)
    for convs in rows:
        yield _row(convs, width, pad_id)


def stack(examples: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Examples -> one batch dict of [R, seq_len] arrays."""
    examples = list(examples)
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
