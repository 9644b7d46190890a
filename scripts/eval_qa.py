"""SQuAD exact match / F1 of a finished `qa` run on any QA JSONL split (e.g. the held-back test split).

    python scripts/eval_qa.py --workdir=runs/qa --data=datasets/stdlib_qa/test.jsonl

Loads the run's latest checkpoint, saved config and tokenizer, windows the split exactly as
training did, decodes each question's best span (data/qa_eval.py) and prints EM and F1 in
percent, overall and per question kind (the question's first two words, e.g. "What does").
"""

from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import checkpoint  # noqa: E402
import steps  # noqa: E402
from data import qa as qa_data, qa_eval, tokenizer as tokenizer_lib  # noqa: E402
from model import heads  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished mode='qa' run.")
flags.DEFINE_string("data", None, "QA JSONL file to score.")
flags.DEFINE_integer("batch_size", 64, "Windows per forward pass.")
flags.mark_flags_as_required(["workdir", "data"])


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines
    saved, params, step = checkpoint.load_for_inference(FLAGS.workdir)
    config = ml_collections.ConfigDict(saved)
    if config.mode != "qa":
        raise app.UsageError(f"{FLAGS.workdir!r} is a mode={config.mode!r} run, not 'qa'")
    tok = tokenizer_lib.load_tokenizer(os.path.join(FLAGS.workdir, "tokenizer.json"))
    examples, stats = qa_data.read_split(FLAGS.data, strict=False)
    feats = qa_data.make_features(examples, tok, seq_len=config.data.seq_len, max_query_len=config.qa.max_query_len,
                                  doc_stride=config.qa.doc_stride)
    model = heads.SpanQA(steps.model_config(config, tok.vocab_size))
    logits = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"],
                                              b["token_types"]))
    starts, ends = [], []
    for i in range(0, len(feats), FLAGS.batch_size):
        s, e = jax.device_get(logits(params, {k: v[i:i + FLAGS.batch_size] for k, v in feats.arrays.items()}))
        starts.append(s)
        ends.append(e)
    preds = qa_eval.predict_answers(feats, np.concatenate(starts), np.concatenate(ends), config.qa.max_answer_len)
    groups = collections.defaultdict(dict)
    for ex in examples:
        golds = [text for text, _ in ex.answers]
        groups["all"][ex.id] = golds
        groups[" ".join(ex.question.split()[:2])][ex.id] = golds
    print(f"{FLAGS.workdir} step {step} on {FLAGS.data} ({len(feats)} windows; skipped: {stats.skipped or 'none'})")
    for name, golds in sorted(groups.items(), key=lambda kv: kv[0] != "all"):
        scores = qa_eval.squad_scores(preds, golds)
        print(f"  {name:>12}: {len(golds):5d} questions  EM {scores['exact_match']:.1f}  F1 {scores['f1']:.1f}")


if __name__ == "__main__":
    app.run(main)
