"""Per-item predictions of a restored run for error analysis (scripts/evaluate.py --out_predictions):
one dict per evaluated item with its input, the model's prediction, the reference and whether it
was right. Each mode record (modes.py) that has items names its function here.

Every function is (config, inputs, model, params, *, workdir, data) -> list[dict], called under the
mesh after `inputs` (the eval set scripts/evaluate.py scores) is built; `data` is the --data path
('' for the run's own validation split).

- classify: where (file:line), text [+ text_pair], predicted label, gold label, correct.
- qa: id, question, predicted answer text, gold answers, exact_match and f1 (0-1, SQuAD-normalised).
- sft, dpo, grpo, ppo: prompt messages, generated answer, reference, kind, correct, finish
  ("length": max_new_tokens cut it) (for the first
  sft / pref / rl .eval_generate problems).

causal and mlm have none: their eval rows are windows cut from a token stream, not items with a
reference, so there is nothing to compare one by one (their eval loss is the per-token measure);
reward's items are pairs, scored one by one by scripts/score.py.
"""

from __future__ import annotations

import os

import task_inputs
import task_eval
from data import classify as classify_data


def classify(config, inputs, model, params, *, workdir: str, data: str) -> list[dict]:
    """The scored validation records in eval order: the split training used (or `data`), labels
    outside the run's labels.json left out as the input builder leaves them out."""
    if data:
        val_recs, _ = classify_data.read_configured(data, config.classify)
    else:
        _, _, val_recs, _ = task_inputs.train_val_records(config, config.classify, "classification")
    labels = classify_data.load_labels(os.path.join(workdir, "labels.json"))
    index = classify_data.label_index(labels)
    records = [(w, r) for w, r in val_recs if classify_data.label_key(r["label"]) in index]
    return task_eval.classify_predictions(model, params, inputs.eval_batches, records, labels)


def _decoded(mode: str, inputs, needs: str):
    if not hasattr(inputs.extra_eval, "predictions"):
        raise ValueError(f"mode={mode!r}: no predictions to write: {needs}")
    return inputs.extra_eval


def qa(config, inputs, model, params, *, workdir: str, data: str) -> list[dict]:
    """Every validation question (all of them, whatever --max_batches)."""
    del config, workdir, data
    return _decoded("qa", inputs, "the eval has no span decoding").predictions(model, params)


def exact_match(block: str):
    """Modes whose eval answers problems greedily (sft; dpo: pref; grpo/ppo: rl): their predictions are the first
    `<block>.eval_generate` problems' answers, as eval/exact_match scores them."""
    def of(config, inputs, model, params, *, workdir: str, data: str) -> list[dict]:
        del workdir, data
        n = config[block].eval_generate
        evaluator = _decoded(config.mode, inputs, f"{block}.eval_generate={n} generates no answers; "
                                                  f"pass --config.{block}.eval_generate=N")
        return evaluator.predictions(model, params)
    return of


sft = exact_match("sft")
preference = exact_match("pref")  # mode dpo
rl = exact_match("rl")  # modes grpo, ppo: the policy's language model answers
