"""Verifiable instruction tasks with exact answers, for SFT / preference / RL smoke runs offline.

Kinds: 'add' (multi-digit addition), 'reverse' (reverse a letter string), 'sort' (sort its letters),
'count' (count a letter in a string). Everything is deterministic from the seed.

- `make_splits(seed, sizes)`: unique problems (by `key`), split into disjoint train/val/test.
- `sft_record(p)`: {"messages": [user question, assistant answer], "kind", "answer"} (data/formats 'chat').
- `preference_record(p, rng)`: {"prompt", "chosen": answer, "rejected": a plausible wrong answer,
  "kind", "answer"} (data/formats 'preference'); wrong answers are the typical slips: a dropped or
  extra carry, a partly reversed word, two letters out of order or one dropped, a count off by one.
- `exact_match(prediction, answer)`: the evaluation check (surrounding whitespace ignored).

scripts/make_tasks.py writes the files; this module is the importable part (scripts are never imported).
"""

from __future__ import annotations

import random
import string

KINDS = ("add", "reverse", "sort", "count")
LETTERS = string.ascii_lowercase


def exact_match(prediction: str, answer: str) -> bool:
    """True iff the prediction is the answer, ignoring surrounding whitespace (case and inner text exact).
    An empty answer (a prompt record without one) is never matched: an empty reply is not its answer."""
    return isinstance(prediction, str) and bool(str(answer).strip()) and prediction.strip() == str(answer).strip()


def _word(rng: random.Random, lo: int = 4, hi: int = 9) -> str:
    while True:
        w = "".join(rng.choice(LETTERS[:12]) for _ in range(rng.randint(lo, hi)))
        if len(set(w)) >= 2:  # at least two distinct letters, so a wrong ordering exists
            return w


def make_problem(kind: str, rng: random.Random) -> dict:
    """{"kind", "question", "answer", "key"}; `key` identifies the problem for split disjointness."""
    if kind == "add":
        a, b = (rng.randint(10 ** (n - 1), 10 ** n - 1) for n in (rng.randint(2, 6), rng.randint(2, 6)))
        return {"kind": kind, "question": f"What is {a} + {b}? Answer with the number only.",
                "answer": str(a + b), "key": f"add:{a}+{b}", "args": [a, b]}
    if kind == "reverse":
        w = _word(rng)
        return {"kind": kind, "question": f"Reverse the word '{w}'. Answer with the word only.",
                "answer": w[::-1], "key": f"reverse:{w}", "args": [w]}
    if kind == "sort":
        w = _word(rng)
        return {"kind": kind, "question": f"Sort the letters of '{w}' alphabetically. Answer with the letters only.",
                "answer": "".join(sorted(w)), "key": f"sort:{w}", "args": [w]}
    if kind == "count":
        w = _word(rng, 5, 12)
        c = rng.choice(w) if rng.random() < 0.8 else rng.choice(LETTERS[:12])
        return {"kind": kind, "question": f"How many times does the letter '{c}' appear in '{w}'? "
                f"Answer with the number only.", "answer": str(w.count(c)), "key": f"count:{c}:{w}", "args": [w, c]}
    raise ValueError(f"task kind {kind!r}: expected one of {KINDS}")


def _add_without_carry(a: int, b: int) -> int:
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    digits = [(int(da[i]) if i < len(da) else 0) + (int(db[i]) if i < len(db) else 0) for i in range(n)]
    return int("".join(str(d % 10) for d in reversed(digits)))


def wrong_answers(problem: dict) -> list[str]:
    """Plausible wrong answers (all different from the answer, no duplicates)."""
    kind, ans = problem["kind"], problem["answer"]
    out = []
    if kind == "add":
        a, b = problem["args"]
        out.append(str(_add_without_carry(a, b)))  # dropped carries
        for k in range(len(ans)):
            out.append(str(a + b + 10 ** k))  # an extra carry
            out.append(str(a + b - 10 ** k))  # a dropped carry at one position
    elif kind in ("reverse", "sort"):
        for i in range(len(ans) - 1):
            if ans[i] != ans[i + 1]:  # two neighbours out of order
                out.append(ans[:i] + ans[i + 1] + ans[i] + ans[i + 2:])
        if kind == "reverse":
            w = problem["args"][0]
            half = len(w) // 2
            out.append(w[:half][::-1] + w[half:])  # only the first half reversed
            out.append(w)  # not reversed at all
        out.append(ans[:-1])  # a letter dropped
    elif kind == "count":
        n = int(ans)
        out += [str(n + 1)] + ([str(n - 1)] if n > 0 else [])
    else:
        raise ValueError(f"task kind {kind!r}: expected one of {KINDS}")
    seen, unique = set(), []
    for x in out:
        if x != ans and not x.startswith("-") and x and x not in seen:
            seen.add(x)
            unique.append(x)
    return unique


def make_splits(seed: int, sizes: dict[str, int], kinds=KINDS, exclude=frozenset()) -> dict[str, list[dict]]:
    """Disjoint splits of unique problems (kinds in rotation), e.g. sizes={'train': 900, 'val': 50, 'test': 50}.
    `exclude`: questions never drawn (another dataset's, so a new held-out set is disjoint from it)."""
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"task kind {k!r}: expected one of {KINDS}")
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"split {name!r} of {n!r} problems: expected a whole number >= 0")
    rng = random.Random(seed)
    total = sum(sizes.values())
    problems, seen = [], set()
    attempts = 0
    while len(problems) < total:
        attempts += 1
        if attempts > 100 * total + 1000:
            raise ValueError(f"could not draw {total} distinct problems of kinds {kinds}")
        p = make_problem(kinds[len(problems) % len(kinds)], rng)
        if p["key"] not in seen and p["question"] not in exclude:
            seen.add(p["key"])
            problems.append(p)
    rng.shuffle(problems)
    out, i = {}, 0
    for name, n in sizes.items():
        out[name] = problems[i:i + n]
        i += n
    return out


def sft_record(problem: dict) -> dict:
    return {"messages": [{"role": "user", "content": problem["question"]},
                         {"role": "assistant", "content": problem["answer"]}],
            "kind": problem["kind"], "answer": problem["answer"]}


def preference_record(problem: dict, rng: random.Random) -> dict:
    return {"prompt": problem["question"], "chosen": problem["answer"], "rejected": rng.choice(wrong_answers(problem)),
            "kind": problem["kind"], "answer": problem["answer"]}
