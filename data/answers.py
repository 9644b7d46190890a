"""How a generated answer is checked against a reference: the config's `data.answer_check`.

- 'exact': the text equals the reference, surrounding whitespace ignored (data/tasks.exact_match): the
  verifiable tasks of scripts/make_tasks.py, whose replies are the answer alone.
- 'final': the two texts' FINAL ANSWERS are equal. A final answer is what follows the last '####'
  (GSM8K's solutions end '#### 72'; the number it starts with, when it does), else the content of the
  last \\boxed{...} (MATH's solutions), else the last number in the text. Two final answers that both
  read as numbers are compared by value ('1,000' = '1000' = '1000.0' = '$1000'; '3/4' = '0.75' =
  '\\dfrac{3}{4}'); others as text without LaTeX's spelling variants (`normal_form`: '\\left(1, 2\\right)' =
  '(1,2)', '5\\text{ cm}' = '5'). A reference without a final answer (empty) is never matched. This is
  the check for replies that reason before they answer (GSM8K, MATH): a reference that is a whole worked
  solution is compared by its final answer, not its wording.

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
    text = text.replace("\u2212", "-")  # a typeset minus sign is a minus
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


_TEX_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\%", "^{\\circ}", "^\\circ", "$", " ")


def normal_form(answer: str) -> str:
    """A final answer with LaTeX's spelling variants removed, as MATH graders do: \\dfrac / \\tfrac as
    \\frac, \\frac{a}{b} of integers as a/b, sizing and spacing commands, degrees, '\\%', '$', spaces and a
    trailing period dropped, and trailing units in \\text{...} ('5\\text{ cm}' -> '5')."""
    s = answer.strip().rstrip(".").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    units = re.fullmatch(r"(.*\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}", s)  # after a value: '5\\text{ cm}'
    s = units.group(1) if units else s
    for token in _TEX_DROP:
        s = s.replace(token, "")
    return re.sub(r"\\frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s).rstrip(".")


def final_match(prediction: str, reference) -> bool:
    """True iff the prediction's final answer equals the reference's (by value when both are numbers, else
    as normal_form text)."""
    want = final_answer(str(reference))
    got = final_answer(prediction)
    if not want or not got:
        return False
    a, b = normal_form(got), normal_form(want)
    x, y = as_number(a), as_number(b)
    if x is not None and y is not None:
        return x == y
    return bool(a) and a == b


CHECKS: dict[str, Callable[[str, str], bool]] = {"exact": tasks.exact_match, "final": final_match}


def check(name: str) -> Callable[[str, str], bool]:
    """The answer check `name` names ('exact' | 'final')."""
    if name not in CHECKS:
        raise ValueError(f"data.answer_check={name!r}: expected one of {sorted(CHECKS)}")
    return CHECKS[name]
