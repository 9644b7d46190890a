"""Extractive QA evaluation: best-span decoding over an example's windows, SQuAD exact match and F1.

Decoding: in every window of an example, the (start, end) token pair with start <= end,
end - start + 1 <= max_answer_len and both tokens inside the context part (never the question,
<cls>, <sep> or padding) that maximises start_logit + end_logit; the best over all windows wins and
maps back to the context substring context[offsets[start][0]:offsets[end][1]]. With unanswerable
questions (SQuAD 2.0, `null_threshold` given) an example's no-answer score is its lowest
start_logit[<cls>] + end_logit[<cls>] over its windows, and it is answered with the empty string when
that score exceeds its best span's by more than `null_threshold` (0: whichever is higher).

Scoring follows SQuAD v1.1's evaluation: answers are normalised (lowercase, punctuation removed,
the articles a/an/the removed, whitespace collapsed); exact match is 1 when the normalised
prediction equals a normalised gold answer; F1 is the bag-of-words overlap F1 of the normalised
tokens; both take the max over the gold answers and are averaged over examples and reported as
percentages (0-100), as the SQuAD script does. An unanswerable question's gold is the empty answer
(SQuAD 2.0's script: only an empty prediction scores, 1 for EM and F1); with any such question the
scores are also reported apart for the questions with and without an answer (`has_answer`,
`no_answer`, as that script's HasAns / NoAns).
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
    """1.0 iff the normalised prediction is a normalised gold; no golds (unanswerable): iff it is empty."""
    p = normalize_answer(prediction)
    return float(max(p == normalize_answer(g) for g in list(golds) or [""]))


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
    return max(_f1(prediction, g) for g in list(golds) or [""])


def squad_scores(predictions: dict[str, str], gold_answers: dict[str, list[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over every gold example (a missing prediction is the empty answer);
    when some have no gold answer (unanswerable), also "exact_match/has_answer", "f1/has_answer" and the
    same for "no_answer", each over its own questions."""
    if not gold_answers:
        raise ValueError("squad_scores: no gold examples")
    em = {i: exact_match(predictions.get(i, ""), golds) for i, golds in gold_answers.items()}
    f1 = {i: f1_score(predictions.get(i, ""), golds) for i, golds in gold_answers.items()}
    out = {"exact_match": 100.0 * float(np.mean(list(em.values()))), "f1": 100.0 * float(np.mean(list(f1.values())))}
    if any(not golds for golds in gold_answers.values()):
        for name, has in (("has_answer", True), ("no_answer", False)):
            ids = [i for i, golds in gold_answers.items() if bool(golds) == has]
            if ids:
                out[f"exact_match/{name}"] = 100.0 * float(np.mean([em[i] for i in ids]))
                out[f"f1/{name}"] = 100.0 * float(np.mean([f1[i] for i in ids]))
    return out


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


def predict_answers(features, start_NxL: np.ndarray, end_NxL: np.ndarray, max_answer_len: int,
                    null_threshold: float | None = None) -> dict[str, str]:
    """Example id -> the context substring of its best span over all its windows (`features`: data.qa.QAFeatures);
    with `null_threshold` (unanswerable questions possible) the empty string where no-answer wins (module doc)."""
    best: dict[int, tuple[float, int, int, int]] = {}
    null: dict[int, float] = {}
    for n in range(len(features)):
        offsets_Lx2 = features.offsets[n]
        score, s, e = best_span(start_NxL[n], end_NxL[n], offsets_Lx2[:, 0] >= 0, max_answer_len)
        k = int(features.example_index[n])
        if s >= 0 and (k not in best or score > best[k][0]):
            best[k] = (score, n, s, e)
        null[k] = min(null.get(k, np.inf), float(start_NxL[n, 0]) + float(end_NxL[n, 0]))  # position 0: <cls>
    out = {}
    for k, ex in enumerate(features.examples):
        if k in best and (null_threshold is None or null[k] - best[k][0] <= null_threshold):
            _, n, s, e = best[k]
            out[ex.id] = ex.context[features.offsets[n, s, 0]:features.offsets[n, e, 1]]
        else:
            out[ex.id] = ""
    return out
