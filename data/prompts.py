"""RL prompts: the records a policy answers during PPO / GRPO, with what a reward checks them against.

Accepted records (JSONL, one a line), rendered with the SFT chat template so generation continues
as the SFT model was trained (the prompt ends with <|assistant|>; generation stops at <|end|>):
- `{"prompt": str, "answer"?: str | number, "kind"?: str}`: a one-turn user prompt; the prompt may also
  be a conversation, a list of messages ending with a user turn (TRL's conversational prompt-only form);
  the answer's field is `answer_field` (config rl.answer_field; e.g. 'solution');
- a chat record (`{"messages": [...]}` ending with an assistant turn, or `{"prompt", "response"}`):
  the conversation before its last assistant turn; the answer is "answer" if present, else that turn's
  content (the SFT task files of scripts/make_tasks.py work as they are);
- a preference record `{"prompt", "chosen", "rejected"}`: the prompt (a string, or a conversation as a
  list of messages); the answer is "answer", else "chosen".

A record that is none of these, has an empty prompt, or renders longer than `max_prompt_len` tokens
is counted under its reason and skipped; under `strict` it raises naming file:line.
`PromptSource` is the grain data source of the train iterator: example i is {"index": i} and the
loop looks the prompt up host-side (prompts differ in length; the decoder pads them itself).
"""

from __future__ import annotations

import numpy as np

from data import chat, formats, preference
from data.sft import Problem, Problems, reference_answer
from data.sources import DataError, ReadStats, Source, source_records
from data.tokenizer import Tokenizer


def _messages_and_answer(record, answer_field: str = "answer") -> tuple[list[dict], str]:
    if not isinstance(record, dict):
        raise formats.FormatError("not an object", f"record is {type(record).__name__}")
    record = chat.chat_record(record)  # TRL's prompt/completion, Alpaca's instruction/input/output
    if "messages" in record or ("prompt" in record and "response" in record):
        messages = chat.messages_of(record)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise formats.FormatError("no final assistant turn", "a chat record needs an assistant turn to end it")
        return messages[:-1], reference_answer(record, messages, answer_field)
    record = formats.explicit_prompt(record)  # an implicit-prompt pair: its shared turns are the prompt
    prompt = record.get("prompt")
    if isinstance(prompt, list) and "chosen" in record:  # a conversational preference record
        formats.validate(record, "preference")
    elif isinstance(prompt, list):  # a conversation for the assistant to answer next
        roles = [m["role"] for m in chat.messages_of({"messages": prompt})]
        if roles[-1] != "user":
            raise formats.FormatError("incomplete chat", f"prompt roles {roles}: a prompt conversation ends with a "
                                      f"user turn (the policy answers it)")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise formats.FormatError("missing field", f"'prompt' must be a non-empty string or a list of messages, "
                                  f"got {prompt!r:.80}")
    fallback = formats.reply_text(record.get("chosen", ""))
    answer = reference_answer(record, [{"role": "assistant", "content": fallback if isinstance(fallback, str) else ""}],
                              answer_field)
    return preference.prompt_messages(record), answer


def read_prompts(path: str, tok: Tokenizer, *, max_prompt_len: int, strict: bool,
                 answer_field: str = "answer") -> tuple[list[Problem], ReadStats]:
    """(problems, stats) of a JSONL file/directory/glob of prompt records (see the module docstring)."""
    stats = ReadStats()
    out, longest = [], 0
    for where, record in source_records(Source(kind="files", path=path), stats, strict=strict):
        try:
            messages, answer = _messages_and_answer(record, answer_field)
            ids = chat.render_prompt(messages, tok)
            if len(ids) > max_prompt_len:
                longest = max(longest, len(ids))
                raise formats.FormatError("prompt too long", f"{len(ids)} tokens > {max_prompt_len}")
        except (formats.FormatError, chat.ChatError) as e:
            if strict:
                raise DataError(f"{where}: {e}") from None
            reason = getattr(e, "reason", "bad record")
            stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
            continue
        kind = record.get("kind", "")
        out.append(Problem(np.asarray(ids, np.int32), answer, kind if isinstance(kind, str) else str(kind),
                           tuple(messages), record))
    if not out:
        hint = (f"; the prompts skipped as too long have up to {longest} tokens, more than max_prompt_len="
                f"{max_prompt_len} (rl.max_prompt_len in a run, --max_prompt_len in a script: raise it)"
                if longest else "")
        raise DataError(f"{path!r}: no usable prompt records ({stats.summary()}){hint}")
    return out, stats


class PromptSource:
    """Random-access {"index": i} over n prompts: the grain source of an RL run's prompt iterator."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"index": np.int32(i)}


def limited(problems: list[Problem], n: int):
    """The first n problems, remembering how many there were (data/sft.Problems: evaluation coverage)."""
    return Problems(problems[:n], len(problems))
