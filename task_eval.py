"""Eval metrics that need the model's outputs decoded, not just summed losses: the
`Inputs.extra_eval` callables train.py and scripts/evaluate.py call with (model, params), and
the per-item predictions behind them (scripts/evaluate.py --out_predictions).

- `exact_match_eval` (modes sft, dpo, grpo, ppo): answers every problem greedily (model/decode's KV-cache
  decoder, stopping at <|end|>), checks the decoded text against the reference (data.answer_check,
  data/answers.py: the exact text, surrounding whitespace ignored, or the final answer) and reports the
  share correct, overall and per problem kind, and the share of answers max_new_tokens cut
  (`eval/exact_match_cut`; a warning names the limit when it cuts a fifth or more).
- `span_qa_eval` (mode qa): start/end logits for every validation window, the best legal span per
  question over its windows (data/qa_eval), SQuAD exact match and F1 in percent.
- `classify_predictions` (mode classify): each validation record's predicted and gold label.

Compiled functions are kept per model (a Flax module hashes by its fields, a LoRA wrapper by
identity): one evaluator called with a second, different model compiles that model's function.
`coverage()` says how many items the decoded metric scored of how many there were.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

import jax
import numpy as np

from data import answers as answers_lib, chat, classify as classify_data, pipeline, qa as qa_data, qa_eval
from data.sft import Problem
from data.tokenizer import Tokenizer
from model import decode, sampling

log = logging.getLogger("lmstack")


def per_model(build: Callable) -> Callable:
    """model -> build(model), built once per distinct model and kept."""
    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = build(model)
        return cache[model]
    return get


class _LastResult:
    """The result of one (model, params) pair, kept until it is taken once: scripts/evaluate.py asks
    for predictions, then the eval's scores reuse them instead of decoding again. Identity, not
    equality: a new params tree is a new result."""

    def __init__(self):
        self._entry = None

    def get(self, model, params, compute: Callable, *, keep: bool):
        entry = self._entry
        if entry is not None and entry[0] is model and entry[1] is params:
            self._entry = (model, params, entry[2]) if keep else None
            return entry[2]
        out = compute()
        self._entry = (model, params, out) if keep else None
        return out


def answers_and_finishes(decoder: decode.Decoder, params, problems: list[Problem], tok: Tokenizer, *, width: int,
                         max_new_tokens: int) -> list[tuple[str, str]]:
    """(greedy answer, finish) for `problems`, the decoder's batch at a time: the decoded text up to <|end|>,
    and 'stop' when it said <|end|>, 'length' when max_new_tokens cut it. A prompt longer than width - 1
    keeps its last width - 1 tokens (room for one new token)."""
    end = tok.special_id(chat.END_TOKEN)
    prompts = [np.asarray(p.prompt, np.int32)[-(width - 1):] for p in problems]
    outs = decoder.generate(params, prompts, max_new_tokens=max_new_tokens, sampling=sampling.GREEDY, stop_ids=[end])
    return [(tok.decode([t for t in o.tokens if t != end]), o.finish_reason) for o in outs]


class ExactMatchEval:
    """(model, params) -> {'eval/exact_match', 'eval/exact_match/<kind>'...} over `problems`."""

    def __init__(self, problems: list[Problem], tok: Tokenizer, *, width: int, max_new_tokens: int,
                 batch_size: int, check: str = "exact", limit_name: str = "max_new_tokens"):
        self.problems, self.tok, self.width, self.max_new_tokens = problems, tok, width, max_new_tokens
        self.limit_name = limit_name  # the config field of max_new_tokens, named when it cuts answers
        self.check_name, self.check = check, answers_lib.check(check)
        self._decoder = per_model(lambda model: decode.Decoder(model, batch=batch_size, cache_len=width))
        self._last = _LastResult()
        # prompts the decoder's context cannot hold whole: answered from their last width - 1 tokens (counted)
        self.prompts_cut = sum(len(p.prompt) > width - 1 for p in problems)
        if self.prompts_cut:
            log.warning("exact match: %d of %d problems' prompts are longer than %d tokens: answered from their last "
                        "%d", self.prompts_cut, len(problems), width - 1, width - 1)

    def _answers(self, model, params, keep: bool) -> list[tuple[str, str]]:
        return self._last.get(model, params, lambda: answers_and_finishes(
            self._decoder(model), params, self.problems, self.tok, width=self.width,
            max_new_tokens=self.max_new_tokens), keep=keep)

    def predictions(self, model, params) -> list[dict]:
        """One dict per problem: prompt messages, generated answer, reference, kind, correct, and finish
        ('length' when max_new_tokens cut the answer)."""
        answers = self._answers(model, params, keep=True)
        return [{"prompt": list(p.messages), "prediction": a, "reference": p.reference, "kind": p.kind,
                 "correct": bool(self.check(a, p.reference)), "finish": finish}
                for p, (a, finish) in zip(self.problems, answers)]

    def coverage(self) -> dict:
        return {"exact_match_scored": len(self.problems),
                "exact_match_of": int(getattr(self.problems, "of", len(self.problems))),
                "exact_match_unit": "problems", "exact_match_prompts_cut": self.prompts_cut,
                "exact_match_check": self.check_name}

    def __call__(self, model, params) -> dict:
        if not self.problems:
            return {}
        answers = self._answers(model, params, keep=False)
        right = collections.Counter()
        total = collections.Counter()
        for p, (a, _) in zip(self.problems, answers):
            ok = self.check(a, p.reference)
            for key in ("", p.kind) if p.kind else ("",):
                right[key] += ok
                total[key] += 1
        cut = sum(finish == "length" for _, finish in answers)
        if cut * 5 >= len(answers):  # a limit that cuts answers scores them wrong, silently
            log.warning("exact match: %d of %d answers were cut at %s=%d tokens before <|end|> and scored as cut "
                        "(raise it if the answers are longer)", cut, len(answers), self.limit_name, self.max_new_tokens)
        out = {"eval/exact_match": right[""] / total[""], "eval/exact_match_cut": cut / len(answers)}
        out.update({f"eval/exact_match/{k}": right[k] / total[k] for k in sorted(total) if k})
        return out


def exact_match_eval(problems: list[Problem], tok: Tokenizer, *, width: int, max_new_tokens: int,
                     batch_size: int, check: str = "exact", limit_name: str = "max_new_tokens") -> ExactMatchEval:
    return ExactMatchEval(problems, tok, width=width, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          check=check, limit_name=limit_name)


def _encoder_logits(model):
    """jit((params, batch) -> the model's outputs) for encoder heads (classifier, span QA)."""
    return jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"],
                                            b["token_types"]))


class SpanQAEval:
    """(model, params) -> SQuAD exact match / F1 (percent) over every validation example, all its windows."""

    def __init__(self, features: qa_data.QAFeatures, batch_size: int, max_answer_len: int,
                 null_threshold: float | None = None):
        self.features, self.max_answer_len, self.null_threshold = features, max_answer_len, null_threshold
        self.batches = pipeline.padded_batches(features, batch_size=batch_size, max_batches=0)
        self.golds = {ex.id: [text for text, _ in ex.answers] for ex in features.examples}
        self._logits = per_model(_encoder_logits)
        self._last = _LastResult()

    def _predict(self, model, params) -> dict[str, tuple[str, float]]:
        outs = [jax.device_get(self._logits(model)(params, b)) for b in self.batches]
        start_NxL = np.concatenate([o[0] for o in outs])[:len(self.features)]
        end_NxL = np.concatenate([o[1] for o in outs])[:len(self.features)]
        return qa_eval.spans_and_margins(self.features, start_NxL, end_NxL, self.max_answer_len)

    def _spans(self, model, params, keep: bool) -> dict[str, tuple[str, float]]:
        return self._last.get(model, params, lambda: self._predict(model, params), keep=keep)

    def _answers(self, model, params, keep: bool) -> dict[str, str]:
        return qa_eval.choose(self._spans(model, params, keep), self.null_threshold)

    def predictions(self, model, params) -> list[dict]:
        """One dict per question: id, question, predicted answer, gold answers ([]: unanswerable), exact match
        and F1 (0-1)."""
        preds = self._answers(model, params, keep=True)
        return [{"id": ex.id, "question": ex.question, "prediction": preds[ex.id], "answers": self.golds[ex.id],
                 "exact_match": qa_eval.exact_match(preds[ex.id], self.golds[ex.id]),
                 "f1": qa_eval.f1_score(preds[ex.id], self.golds[ex.id])} for ex in self.features.examples]

    def coverage(self) -> dict:
        n = len(self.features.examples)
        return {"exact_match_scored": n, "exact_match_of": n, "exact_match_unit": "questions"}

    def __call__(self, model, params) -> dict:
        spans = self._spans(model, params, keep=False)
        scores = qa_eval.squad_scores(qa_eval.choose(spans, self.null_threshold), self.golds)
        out = {f"eval/{k}": v for k, v in scores.items()}
        if self.null_threshold is not None:  # as the SQuAD 2.0 script's best_exact / best_exact_thresh
            out["eval/best_null_threshold"], out["eval/best_exact_match"], out["eval/best_f1"] = \
                qa_eval.best_null_threshold(spans, self.golds)
        return out


def span_qa_eval(features: qa_data.QAFeatures, batch_size: int, max_answer_len: int,
                 null_threshold: float | None = None) -> SpanQAEval:
    return SpanQAEval(features, batch_size, max_answer_len, null_threshold)


def classify_predictions(model, params, batches: list[dict], records: list[tuple[str, dict]],
                         labels: list) -> list[dict]:
    """One dict per scored record (the non-padding rows of `batches`, which encode `records` in order):
    where (file:line), text [+ text_pair], predicted and gold label names, correct."""
    logits = _encoder_logits(model)
    predicted, gold = [], []
    for b in batches:
        real_B = np.asarray(b["weight"]) > 0
        logits_BxC = np.asarray(jax.device_get(logits(params, b)))
        predicted += list(np.argmax(logits_BxC, axis=-1)[real_B])
        gold += list(np.asarray(b["label"])[real_B])
    if len(predicted) > len(records):
        raise ValueError(f"{len(predicted)} scored rows but only {len(records)} validation records to name them")
    index = classify_data.label_index(labels)
    out = []
    for (where, r), p, g in zip(records, predicted, gold):
        if index[classify_data.label_key(r["label"])] != int(g):
            raise ValueError(f"{where}: record label {r['label']!r} is not the scored row's label {labels[int(g)]!r} "
                             f"(records and eval rows out of step)")
        row = {"where": where, "text": r["text"]}
        if r.get("text_pair") is not None:
            row["text_pair"] = r["text_pair"]
        out.append(dict(row, prediction=labels[int(p)], label=r["label"], correct=bool(int(p) == int(g))))
    return out
