"""OpenAI's response and stream-chunk JSON for /v1/completions and /v1/chat/completions (openai_api.py's answers).

    view = TextView("sft", tok, logprobs=2)         # or ChatView("sft", tok, top_logprobs=None)
    view.response(choices, usage(prompt_tokens, choices))   # the whole answer
    sse(view.chunk(choice, update))                          # one `data: {...}` line of a stream

Log-probs: completions give tokens, token_logprobs, top_logprobs ({token: log-prob}) and text_offset
(characters of settled text before each token, from the start of the generated text); chat gives
content [{token, logprob, bytes, top_logprobs}]. A special token (the <eos> / <|end|> that stopped a
completion) is named by its text, e.g. "<|end|>", and adds nothing to the text.
"""

from __future__ import annotations

import json
import math
import time
import uuid

import serving
from data.tokenizer import SPECIALS, Tokenizer


class Choice:
    """One completion as its updates arrive."""

    def __init__(self):
        self.tokens, self.logprobs, self.top, self.text, self.finish_reason = [], [], [], "", None

    def add(self, u: serving.Update) -> None:
        self.tokens += u.tokens
        self.logprobs += u.logprobs
        self.top += u.top or [[] for _ in u.tokens]
        self.text += u.text
        self.finish_reason = u.finish_reason


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _num(x: float) -> float:
    """A log-prob JSON can carry (JSON has no -inf; OpenAI uses -9999 there)."""
    return float(x) if math.isfinite(x) else -9999.0


class _View:
    kind, object_name, chunk_object = "", "", ""

    def __init__(self, model_name: str, tok: Tokenizer, k: int | None):
        self.model_name, self.tok, self.k = model_name, tok, k  # k: alternatives per token; None = no log-probs
        self.id, self.created = f"{self.kind}-{uuid.uuid4().hex}", int(time.time())

    def head(self, chunk: bool = False) -> dict:
        return {"id": self.id, "object": self.chunk_object if chunk else self.object_name, "created": self.created,
                "model": self.model_name}

    def token_text(self, i: int) -> str:
        if self.tok.base_size <= i < self.tok.vocab_size:
            return SPECIALS[i - self.tok.base_size]
        return self.tok.decode([i])

    def token_bytes(self, i: int) -> list[int]:
        if getattr(self.tok, "kind", "") == "byte" and 0 <= i < 256:
            return [i]
        return list(self.token_text(i).encode("utf-8"))

    def opening(self, n: int) -> list[dict]:
        """Chunks a stream starts with, before any token."""
        return []


class TextView(_View):
    """/v1/completions."""
    kind, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def logprobs(self, choice: Choice, start: int, end: int):
        if self.k is None:
            return None
        limit = len(choice.text) if choice.finish_reason else None  # a stop string cut the text short
        offsets = [len(serving.settled(self.tok.decode(choice.tokens[:i]))) for i in range(start, end)]
        return {"tokens": [self.token_text(t) for t in choice.tokens[start:end]],
                "token_logprobs": [_num(x) for x in choice.logprobs[start:end]],
                "top_logprobs": [self._top(top) for top in choice.top[start:end]],
                "text_offset": [o if limit is None else min(o, limit) for o in offsets]}

    def _top(self, top) -> dict:
        """{token text: log-prob} of the k most likely, most likely first. Tokens whose text is the same (a
        byte of a partial UTF-8 character shows as U+FFFD) share one key: the likelier one's value."""
        out = {}
        for i, lp in top[:self.k]:
            out.setdefault(self.token_text(i), _num(lp))
        return out

    def chunk(self, choice: Choice, u: serving.Update) -> dict:
        end = len(choice.tokens)
        return {**self.head(True), "choices": [{"index": u.index, "text": u.text, "finish_reason": u.finish_reason,
                                                "logprobs": self.logprobs(choice, end - len(u.tokens), end)}]}

    def response(self, choices: list[Choice], usage: dict) -> dict:
        return {**self.head(), "usage": usage, "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": self.logprobs(c, 0, len(c.tokens))} for i, c in enumerate(choices)]}


class ChatView(_View):
    """/v1/chat/completions."""
    kind, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _entry(self, i: int, lp: float) -> dict:
        return {"token": self.token_text(i), "logprob": _num(lp), "bytes": self.token_bytes(i)}

    def logprobs(self, choice: Choice, start: int, end: int):
        if self.k is None:
            return None
        return {"content": [{**self._entry(t, lp), "top_logprobs": [self._entry(i, x) for i, x in top[:self.k]]}
                            for t, lp, top in zip(choice.tokens[start:end], choice.logprobs[start:end],
                                                  choice.top[start:end])]}

    def opening(self, n: int) -> list[dict]:
        return [{**self.head(True), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]} for i in range(n)]

    def chunk(self, choice: Choice, u: serving.Update) -> dict:
        end = len(choice.tokens)
        return {**self.head(True), "choices": [{"index": u.index, "delta": {"content": u.text},
                                                "finish_reason": u.finish_reason,
                                                "logprobs": self.logprobs(choice, end - len(u.tokens), end)}]}

    def response(self, choices: list[Choice], usage: dict) -> dict:
        return {**self.head(), "usage": usage, "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
             "logprobs": self.logprobs(c, 0, len(c.tokens))} for i, c in enumerate(choices)]}
