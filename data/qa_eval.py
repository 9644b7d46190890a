"""Extractive QA evaluation: best-span decoding over an example's windows, SQuAD exact match and F1.

Decoding: in every window of an example, the (start, end) token pair with start <= end,
end - start + 1 <= max_answer_len and both tokens inside the context part (never the question,
<cls>, <sep> or padding) that maximises start_logit + end_logit; the best over all windows wins and
maps back to the context substring context[offsets[start][0]:offsets[end][1]].

Scoring follows SQuAD v1.1's evaluation: answers are normalised (lowercase, punctuation removed,
the articles a/an/the removed, whitespace collapsed); exact match is 1 when the normalised
prediction equals a normalised gold answer; F1 is the bag-of-words overlap F1 of the normalised
tokens; both take the max over the gold answers and are averaged over examples and reported as
percentages (0-100), as the SQuAD script does.
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds) -> float:
    p = normalize_answer(prediction)
    return float(max(p == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:  # an answer that normalises to nothing only matches nothing
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds) -> float:
    return max(_f1(prediction, g) for g in golds)


def squad_scores(predictions: dict[str, str], gold_answers: dict[str, list[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over every gold example (a missing prediction scores 0)."""
    if not gold_answers:
        raise ValueError("squad_scores: no gold examples")
    em = [exact_match(predictions.get(i, ""), golds) for i, golds in gold_answers.items()]
    f1 = [f1_score(predictions.get(i, ""), golds) for i, golds in gold_answers.items()]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def best_span(start_L: np.ndarray, end_L: np.ndarray, context_L: np.ndarray,
              max_answer_len: int) -> tuple[float, int, int]:
    """(score, start, end) of the best legal span of one window; (-inf, -1, -1) if it has no context."""
    if max_answer_len < 1:
        raise ValueError(f"qa.max_answer_len={max_answer_len} must be >= 1")
    n = len(start_L)
    i_L = np.arange(n)
    width_LxL = i_L[None, :] - i_L[:, None]  # end - start
    legal_LxL = context_L[:, None] & context_L[None, :] & (width_LxL >= 0) & (width_LxL < max_answer_len)
    if not legal_LxL.any():
        return float("-inf"), -1, -1
    score_LxL = np.where(legal_LxL, start_L[:, None].astype(np.float64) + end_L[None, :], -np.inf)
    s, e = np.unravel_index(int(np.argmax(score_LxL)), score_LxL.shape)
    return float(score_LxL[s, e]), int(s), int(e)


def predict_answers(features, start_NxL: np.ndarray, end_NxL: np.ndarray, max_answer_len: int) -> dict[str, str]:
    """Example id -> the context substring of its best span over all its windows (`features`: data.qa.QAFeatures)."""
    best: dict[int, tuple[float, int, int, int]] = {}
    for n in range(len(features)):
        offsets_Lx2 = features.offsets[n]
        score, s, e = best_span(start_NxL[n], end_NxL[n], offsets_Lx2[:, 0] >= 0, max_answer_len)
        k = int(features.example_index[n])
        if s >= 0 and (k not in best or score > best[k][0]):
            best[k] = (score, n, s, e)
    out = {}
    for k, ex in enumerate(features.examples):
        if k in best:
            _, n, s, e = best[k]
            out[ex.id] = ex.context[features.offsets[n, s, 0]:features.offsets[n, e, 1]]
        else:
            out[ex.id] = ""
    return out
