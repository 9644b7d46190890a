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


def spans_and_margins(features, start_NxL: np.ndarray, end_NxL: np.ndarray,
                      max_answer_len: int) -> dict[str, tuple[str, float]]:
    """Example id -> (the context substring of its best span over all its windows, its no-answer margin: the
    lowest <cls> score over its windows minus that span's score; inf where no window has a legal span)."""
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
        if k in best:
            score, n, s, e = best[k]
            out[ex.id] = (ex.context[features.offsets[n, s, 0]:features.offsets[n, e, 1]], null[k] - score)
        else:
            out[ex.id] = ("", np.inf)
    return out


def choose(spans: dict[str, tuple[str, float]], null_threshold: float | None) -> dict[str, str]:
    """Example id -> its answer: the span, or (`null_threshold` given) the empty string where the margin exceeds it."""
    return {i: "" if null_threshold is not None and margin > null_threshold else text
            for i, (text, margin) in spans.items()}


def predict_answers(features, start_NxL: np.ndarray, end_NxL: np.ndarray, max_answer_len: int,
                    null_threshold: float | None = None) -> dict[str, str]:
    """Example id -> the context substring of its best span over all its windows (`features`: data.qa.QAFeatures);
    with `null_threshold` (unanswerable questions possible) the empty string where no-answer wins (module doc)."""
    return choose(spans_and_margins(features, start_NxL, end_NxL, max_answer_len), null_threshold)


def best_null_threshold(spans: dict[str, tuple[str, float]], gold_answers: dict[str, list[str]]
                        ) -> tuple[float, float, float]:
    """(threshold, exact match, F1 at it; percent) of the no-answer threshold with the highest exact match on these
    examples (the official SQuAD 2.0 script's best_exact: tuned on the split it scores, so an upper bound there;
    set qa.null_threshold to it for another split). Ties go to the smallest threshold."""
    ids = list(gold_answers)
    margin = np.array([spans[i][1] for i in ids])
    em_span = np.array([exact_match(spans[i][0], gold_answers[i]) for i in ids])
    em_null = np.array([exact_match("", gold_answers[i]) for i in ids])
    f1_span = np.array([f1_score(spans[i][0], gold_answers[i]) for i in ids])
    f1_null = em_null  # the empty answer's F1 is its exact match
    finite = np.unique(margin[np.isfinite(margin)])
    low = finite[0] - 1.0 if len(finite) else 0.0  # below every margin: always no-answer (a finite number to log)
    candidates = np.concatenate([[low], finite])  # null wherever margin > t: every distinct outcome
    null_CxN = margin[None, :] > candidates[:, None]
    em_C = np.where(null_CxN, em_null, em_span).mean(axis=1)
    c = int(np.argmax(em_C))
    f1 = np.where(null_CxN[c], f1_null, f1_span).mean()
    return float(candidates[c]), 100.0 * float(em_C[c]), 100.0 * float(f1)
