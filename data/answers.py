"""How a generated answer is checked against a reference: the config's `data.answer_check`.

- 'exact': the text equals the reference, surrounding whitespace ignored (data/tasks.exact_match): the
  verifiable tasks of scripts/make_tasks.py, whose replies are the answer alone.
- 'final': the two texts' FINAL ANSWERS are equal. A final answer is what follows the last '####'
  (GSM8K's solutions end '#### 72'; the number it starts with, when it does), else the content of the
  last \\boxed{...} (MATH's solutions), else the last number in the text. Two final answers that both
  read as numbers are compared by value ('1,000' = '1000' = '1000.0' = '$1000'; '3/4' = '0.75'); others
  as text, surrounding whitespace and a trailing period ignored. A reference without a final answer
  (empty) is never matched. This is the check for replies that reason before they answer (GSM8K, MATH):
  a reference that is a whole worked solution is compared by its final answer, not its wording.

`check(name)` is the function (prediction, reference) -> bool; an unknown name is an error naming it.
The evaluations that decode answers (eval/exact_match of modes sft, dpo, grpo, ppo), RL's
rl/accuracy and the predictions' "correct" all use it; the reward 'final_answer' (rl/rewards.py) is
the same check as a reward.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

from data import tasks

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (its braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str:
    """The final answer of `text` (module docstring): after the last '####', else the last \\boxed{} content,
    else the last number; '' when there is none."""
    if not isinstance(text, str):
        return ""
    if "####" in text:  # GSM8K: the number right after it when there is one ('#### 72 apples' -> '72')
        tail = text.rsplit("####", 1)[1].strip()
        lead = _NUMBER.match(tail)
        return lead.group() if lead else tail
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else ""


def as_number(text: str) -> Fraction | None:
    """The value of a number written '1,234', '-3.5', '$12', '3/4', '50%' (as 50), '7.' ...; None if it is not one."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").removesuffix("%").strip()
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return None
    num, _, den = s.partition("/")
    try:
        return Fraction(num) / Fraction(den or 1)
    except ZeroDivisionError:
        return None


def final_match(prediction: str, reference) -> bool:
    """True iff the prediction's final answer equals the reference's (by value when both are numbers)."""
    want = final_answer(str(reference))
    got = final_answer(prediction)
    if not want or not got:
        return False
    a, b = as_number(got), as_number(want)
    if a is not None and b is not None:
        return a == b
    return got.rstrip(".").strip() == want.rstrip(".").strip()


CHECKS: dict[str, Callable[[str, str], bool]] = {"exact": tasks.exact_match, "final": final_match}


def check(name: str) -> Callable[[str, str], bool]:
    """The answer check `name` names ('exact' | 'final')."""
    if name not in CHECKS:
        raise ValueError(f"data.answer_check={name!r}: expected one of {sorted(CHECKS)}")
    return CHECKS[name]
