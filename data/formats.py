"""Task records: classification, extractive QA, chat/SFT and preference pairs; validation.

Schemas (one JSON object a line; extra fields are kept):
- 'classification': {"text": str, "label": str | int (not bool)} (+ optional "text_pair": str)
- 'qa' (SQuAD style): {"context": str, "question": str,
      "answers": {"text": [str, ...], "answer_start": [int, ...]}} with equal-length lists and
      context[answer_start[i]:][:len(text[i])] == text[i]. No answers = an unanswerable question.
- 'chat': {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} with at
      least one user and one assistant turn and a system turn only first; or
      {"prompt": str, "response": str}; ShareGPT's {"conversations": [{"from", "value"}]}, TRL's
      {"prompt", "completion"}, Alpaca's {"instruction", "input"?, "output"} and the question/answer pairs
      of GSM8K {"question", "answer"}, MATH {"problem", "solution"} and MetaMathQA {"query", "response"}
      are read as their "messages" form (data/chat.chat_record).
- 'preference': {"prompt": str | [messages], "chosen": str, "rejected": str}, chosen != rejected; a
      list prompt is the conversation so far (the 'chat' message rules, ending with a user turn) and
      chosen / rejected are the next assistant reply, as text or (TRL's conversational form) as a
      list of that one message [{"role": "assistant", "content": str}] (`reply_text` reads either).
      Sides that are whole conversations sharing every turn but their final assistant one are read
      too (`explicit_prompt`): TRL's implicit-prompt pairs (no "prompt"; trl-lib's
      ultrafeedback_binarized, hh-rlhf) and HuggingFaceH4's ultrafeedback_binarized (a "prompt" that
      is the shared user turn's text); the shared turns become the prompt. Anthropic HH-RLHF's raw
      pairs (both sides transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...') are read as such conversations,
      and a prompt that is a transcript ending in an empty 'Assistant:' cue (DeepSpeed-Chat's
      Dahoas/rm-static) as its turns, the sides stripped (data/chat.transcript_messages). OpenAI's
      preference fine-tuning records {"input": {"messages"}, "preferred_output", "non_preferred_output"}
      are the pair of those messages and outputs.

`validate(record, fmt)` returns the record (an implicit-prompt pair with its prompt made explicit) or raises `FormatError(reason, detail)`: `reason`
is a short name counted in the manifest ('missing field', 'wrong type', 'empty text',
'answer_start mismatch', 'unknown role', ...), `detail` says which field and value.
`read_records(source, fmt, strict=...)` validates every record of a source: under strict the
first bad one raises a `FormatError` naming the file and line; otherwise it is counted in
`stats.skipped` as "<fmt>: <reason>" and skipped.
"""

from __future__ import annotations

from typing import Any, Iterator

from data import chat
from data.sources import DataError, ReadStats, Source, source_records

FORMATS = ("classification", "qa", "chat", "preference")


class FormatError(DataError):
    def __init__(self, reason: str, detail: str, where: str = ""):
        self.reason, self.detail, self.where = reason, detail, where
        super().__init__(f"{where}: {reason}: {detail}" if where else f"{reason}: {detail}")


def _string(record: dict, field: str, *, required: bool = True) -> str | None:
    if field not in record:
        if required:
            raise FormatError("missing field", f"no {field!r}")
        return None
    value = record[field]
    if not isinstance(value, str):
        raise FormatError("wrong type", f"{field!r} is {type(value).__name__}, expected str")
    if not value.strip():
        raise FormatError("empty text", f"{field!r} is empty")
    return value


def _classification(r: dict) -> None:
    _string(r, "text")
    _string(r, "text_pair", required=False)
    if "label" not in r:
        raise FormatError("missing field", "no 'label'")
    label = r["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise FormatError("wrong type", f"'label' is {type(label).__name__}, expected str or int")
    if isinstance(label, str) and not label.strip():
        raise FormatError("empty text", "'label' is empty")


def _qa(r: dict) -> None:
    context = _string(r, "context")
    _string(r, "question")
    answers = r.get("answers")
    if not isinstance(answers, dict):
        raise FormatError("missing field" if answers is None else "wrong type", "'answers' must be an object "
                          "{'text': [...], 'answer_start': [...]}")
    texts, starts = answers.get("text"), answers.get("answer_start")
    if not isinstance(texts, list) or not isinstance(starts, list):
        raise FormatError("wrong type", "'answers.text' and 'answers.answer_start' must be lists")
    if len(texts) != len(starts):
        raise FormatError("answer count mismatch", f"{len(texts)} answer texts but {len(starts)} answer_start")
    for i, (text, start) in enumerate(zip(texts, starts)):
        if not isinstance(text, str) or not text:
            raise FormatError("wrong type", f"answers.text[{i}] must be a non-empty str")
        if isinstance(start, bool) or not isinstance(start, int):
            raise FormatError("wrong type", f"answers.answer_start[{i}] is {type(start).__name__}, expected int")
        if not 0 <= start <= len(context) - len(text) or context[start:start + len(text)] != text:
            found = context[start:start + len(text)] if 0 <= start < len(context) else ""
            raise FormatError("answer_start mismatch",
                              f"answers.text[{i}]={text[:40]!r} is not at context[{start}] (found {found[:40]!r})")


def _chat(r: dict) -> None:
    if "messages" not in r:
        if "prompt" in r or "response" in r:
            _string(r, "prompt")
            _string(r, "response")
            return
        raise FormatError("missing field", chat.NO_MESSAGES)
    roles = _messages(r["messages"], "messages")
    if "user" not in roles or "assistant" not in roles:
        raise FormatError("incomplete chat", f"roles {roles} need at least one user and one assistant turn")


def _messages(messages, field: str) -> list[str]:
    """The roles of a checked message list (data/chat.checked_messages: the SFT reader's check)."""
    return [m["role"] for m in chat.checked_messages(messages, field, FormatError)]


def reply_text(value) -> str:
    """A preference side's text: the string itself, or the content of a one-assistant-message list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    return value


def _reply(r: dict, field: str) -> str:
    if isinstance(r.get(field), list) and not isinstance(reply_text(r[field]), str):
        raise FormatError("wrong type", f"{field!r} is a list but not one assistant message "
                          f"[{{'role': 'assistant', 'content': str}}]: {r[field]!r:.200}")
    return _string({field: reply_text(r[field])} if field in r else {}, field)


def explicit_prompt(r: dict) -> dict:
    """A preference record whose sides are whole conversations (lists of messages with the same turns
    before their last one, an assistant reply) as {"prompt": those shared turns, "chosen": [its last turn],
    "rejected": [its last turn]} (a copy, other fields kept): TRL's implicit-prompt pairs (no "prompt") and
    pairs that also give the prompt (HuggingFaceH4's ultrafeedback_binarized: the user turn's text), which
    must then be those shared turns or the last of them. Any other record is returned as it is (validation
    names what it lacks)."""
    r = _from_transcripts(_from_openai(r))
    chosen, rejected = r.get("chosen"), r.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)) \
            or not all(isinstance(m, dict) for m in chosen + rejected) or len(chosen) < 2 or len(rejected) < 2:
        return r
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise FormatError("chosen equals rejected", "'chosen' and 'rejected' are identical conversations")
    if (len(chosen), len(rejected)) != (shared + 1, shared + 1):
        raise FormatError("implicit prompt", f"'chosen' ({len(chosen)} turns) and 'rejected' ({len(rejected)} turns) "
                          f"share {shared} turns: whole conversations as a pair's sides differ only in their last "
                          f"turn, the assistant's reply (otherwise give a 'prompt' and one reply a side)")
    if "prompt" in r:
        prompt, last = r["prompt"], chosen[shared - 1]
        if prompt != chosen[:shared] and not (last.get("role") == "user" and prompt == last.get("content")):
            raise FormatError("prompt mismatch", f"'prompt' {prompt!r:.80} is neither the {shared} turns both sides "
                              f"start with nor the last of them ({last!r:.80})")
    return {**r, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _from_openai(r: dict) -> dict:
    """OpenAI's preference fine-tuning record {"input": {"messages": [...]}, "preferred_output": [assistant
    message], "non_preferred_output": [...]} as {"prompt": those messages, "chosen", "rejected"} (other
    fields kept); any other record as it is."""
    given = r.get("input")
    if not (isinstance(given, dict) and "messages" in given and "preferred_output" in r
            and "non_preferred_output" in r and "prompt" not in r):
        return r
    rest = {k: v for k, v in r.items() if k not in ("input", "preferred_output", "non_preferred_output")}
    return {**rest, "prompt": given["messages"], "chosen": r["preferred_output"],
            "rejected": r["non_preferred_output"]}


def _from_transcripts(r: dict) -> dict:
    """Anthropic HH-RLHF's raw pairs (both sides whole transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...', no
    prompt) as conversations, and a prompt that is a transcript ending in an empty 'Assistant:' cue
    (DeepSpeed-Chat's Dahoas/rm-static: the sides are then the replies) as its messages (data/chat.py's
    transcript_messages); any other record as it is."""
    if "prompt" not in r:
        sides = [chat.transcript_messages(r.get(k)) for k in ("chosen", "rejected")]
        return {**r, "chosen": sides[0], "rejected": sides[1]} if None not in sides else r
    prompt = chat.transcript_prompt(r["prompt"])
    if prompt is None:
        return r
    strip = {k: r[k].strip() for k in ("chosen", "rejected") if isinstance(r.get(k), str)}  # ' Hello!' after the cue
    return {**r, "prompt": prompt, **strip}


def _preference(r: dict) -> None:
    if isinstance(r.get("prompt"), list):
        roles = _messages(r["prompt"], "prompt")
        if roles[-1] != "user":
            raise FormatError("incomplete chat", f"prompt roles {roles}: the conversation must end with a user turn "
                              f"(chosen and rejected are the assistant's reply to it)")
    elif "prompt" not in r:
        raise FormatError("missing field", "no 'prompt' (nor chosen and rejected as whole conversations, lists of "
                          "messages that differ only in their last turn: TRL's implicit prompt, or Anthropic HH "
                          "transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    else:
        _string(r, "prompt")
    chosen, rejected = _reply(r, "chosen"), _reply(r, "rejected")
    if chosen == rejected:
        raise FormatError("chosen equals rejected", "'chosen' and 'rejected' are identical")


_VALIDATORS = {"classification": _classification, "qa": _qa, "chat": _chat, "preference": _preference}


def validate(record: Any, fmt: str) -> dict:
    if fmt not in _VALIDATORS:
        raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
    if not isinstance(record, dict):
        raise FormatError("not an object", f"record is {type(record).__name__}, expected a JSON object")
    if fmt == "preference":
        record = explicit_prompt(record)
    elif fmt == "chat":
        try:
            record = chat.chat_record(record)  # TRL's prompt/completion, Alpaca's instruction/input/output
        except chat.ChatError as e:
            raise FormatError(e.reason, e.detail) from None
    _VALIDATORS[fmt](record)
    return record


def record_text(record: dict, fmt: str) -> str:
    """The text a record contributes to deduplication, splitting and tokenizer training."""
    if fmt == "classification":
        parts = [record["text"], record.get("text_pair") or ""]
    elif fmt == "qa":
        parts = [record["context"], record["question"]]
    elif fmt == "chat":
        if "messages" in record:
            parts = [m["content"] for m in record["messages"]]
        else:
            parts = [record["prompt"], record["response"]]
    elif fmt == "preference":
        prompt = record["prompt"]
        parts = [m["content"] for m in prompt] if isinstance(prompt, list) else [prompt]
        parts += [reply_text(record["chosen"]), reply_text(record["rejected"])]
    else:
        raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
    return "\n".join(p for p in parts if p)


def renamed(record: Any, fields: dict[str, str] | None) -> Any:
    """The record with each schema field taken from the record's own name for it (`fields`: schema name ->
    the data's, e.g. {"text": "sentence"} for GLUE's SST-2); a record lacking one is named by the data's."""
    if not fields or not isinstance(record, dict):
        return record
    for name, theirs in fields.items():
        if theirs != name:
            if theirs not in record:
                if name == "text_pair":  # optional
                    continue
                raise FormatError("missing field", f"no {theirs!r} (read as {name!r}); the record has {sorted(record)}")
            record = {**record, name: record[theirs]}
    return record


def read_records(src: Source, fmt: str, stats: ReadStats, *, strict: bool = False,
                 fields: dict[str, str] | None = None) -> Iterator[tuple[str, dict]]:
    """Valid (where, record) pairs of a source; bad ones raise (strict) or are counted and skipped. `fields`:
    the data's names for schema fields (`renamed`)."""
    if fmt not in _VALIDATORS:
        raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
    for where, record in source_records(src, stats, strict=strict):
        try:
            record = validate(renamed(record, fields), fmt)
        except FormatError as e:
            if strict:
                raise FormatError(e.reason, e.detail, where) from None
            stats.skip(f"{fmt}: {e.reason}")
            continue
        stats.documents += 1
        yield where, record


def read_split(path: str, fmt: str, *, strict: bool, fields: dict[str, str] | None = None
               ) -> tuple[list[tuple[str, dict]], ReadStats]:
    """All valid (where, record) pairs of a `fmt` file/directory/glob; an error if none is valid."""
    stats = ReadStats()
    records = list(read_records(Source(kind="files", path=path), fmt, stats, strict=strict, fields=fields))
    if not records:
        raise DataError(f"{path!r}: no valid {fmt} records ({stats.summary()})")
    return records, stats
