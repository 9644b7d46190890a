"""Exact match of greedy generations: the SFT eval metric for verifiable tasks.

`exact_match_eval(problems, tok, ...)` returns the `Inputs.extra_eval` callable train.py and
scripts/evaluate.py call with (model, params): it answers every problem greedily (model/decode,
stopping at <|end|>), compares the decoded text with the reference (data/tasks.exact_match:
surrounding whitespace ignored) and reports the share correct, overall and per problem kind.
"""

from __future__ import annotations

import collections

import numpy as np

from data import chat, tasks
from data.sft import Problem
from data.tokenizer import Tokenizer
from model import decode


def answer(generate, params, problems: list[Problem], tok: Tokenizer, *, width: int, batch_size: int) -> list[str]:
    """Greedy answers (decoded text up to <|end|>) for `problems`, `batch_size` at a time."""
    end = tok.special_id(chat.END_TOKEN)
    out = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        buf, lengths = decode.left_align([p.prompt for p in chunk], width, batch_size, tok.pad_id)
        ids = np.asarray(generate(params, buf, lengths))
        out += [tok.decode(decode.until_stop(row, end)) for row in ids[:len(chunk)]]
    return out


def exact_match_eval(problems: list[Problem], tok: Tokenizer, *, width: int, max_new_tokens: int, batch_size: int):
    """(model, params) -> {'eval/exact_match', 'eval/exact_match/<kind>'...} over `problems`."""
    compiled = {}

    def run(model, params) -> dict:
        if not problems:
            return {}
        if "fn" not in compiled:
            compiled["fn"] = decode.make_greedy(model, width=width, max_new_tokens=max_new_tokens,
                                                stop_id=tok.special_id(chat.END_TOKEN))
        answers = answer(compiled["fn"], params, problems, tok, width=width, batch_size=batch_size)
        right = collections.Counter()
        total = collections.Counter()
        for p, a in zip(problems, answers):
            ok = tasks.exact_match(a, p.reference)
            for key in ("", p.kind) if p.kind else ("",):
                right[key] += ok
                total[key] += 1
        out = {"eval/exact_match": right[""] / total[""]}
        out.update({f"eval/exact_match/{k}": right[k] / total[k] for k in sorted(total) if k})
        return out

    return run
