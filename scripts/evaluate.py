"""Evaluate a trained run's checkpoint exactly as training evaluates; print one JSON object.

    python scripts/evaluate.py --workdir=runs/cls [--step=N] [--split=val|test] [--data=PATH] \
        [--max_batches=0] [--out=metrics.json] [--out_predictions=preds.jsonl] [--config.mesh.data=...]

The run's saved config (from the checkpoint), tokenizer and labels come from --workdir; params
are restored read-only onto this machine's mesh. Without --data: the run's validation split,
rebuilt as training built it (all batches unless --max_batches). --data replaces the eval set:
for classify/qa/sft a JSONL file (as <mode>.val_path); for causal/mlm a text file/dir evaluated in
full (data.val_fraction does not apply), or a prepared dataset's --split. --split=test needs
--data unless a causal/mlm run trained on a prepared dataset (its test split). --split labels
--data; without it the output says "split": "data" (a prepared dataset directory: its 'val' split).

The JSON object names what was scored: "data" is the file read ("held_out" says how the
validation share was cut from data.path when there is no validation file), "examples" counts
the eval loss's items in "example_unit" (windows, records, conversations, pairs; RL runs: none), and decoded metrics
(SFT/QA exact match) add "exact_match_scored" of "exact_match_of" items (SFT scores only the
first sft.eval_generate problems) and, for decoded answers, "exact_match_check" (data.answer_check:
'exact' text or 'final' answers). --out_predictions=FILE writes one JSON line per item for
error analysis (classify: text, predicted and gold label; qa: question, predicted and gold
answers, exact match, F1; sft: prompt messages, generated answer, reference, kind, correct, finish);
causal/mlm have no per-item predictions and exit 1 saying so.
`--config.x.y=v` overrides the saved config (e.g. the mesh or batch size). Nothing in the run's
workdir is written, except that a dpo run evaluated on other pairs caches their reference log-probs
there (rl/reference.py). Errors (workdir, checkpoint, step, data, override) exit 1 with the reason.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import evaluation  # noqa: E402
import overrides  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tokenizer.json, labels.json).")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
    flags.DEFINE_enum("split", None, ["val", "test"], "Which split (a prepared dataset's, or a label for --data); "
                      "default: the run's validation split, or 'data' for --data.")
    flags.DEFINE_string("data", "", "Evaluate on this file/dir instead of the run's validation split.")
    flags.DEFINE_integer("max_batches", 0, "Eval batches; 0 = all.", lower_bound=0)
    flags.DEFINE_string("out", "", "Also write the JSON object to this file.")
    flags.DEFINE_string("out_predictions", "", "Also write one JSON line per evaluated item (input, prediction, "
                        "reference, correct) to this file; not for causal/mlm.")


def evaluate(workdir: str, *, step: int = -1, split: str = "", data: str = "", max_batches: int = 0,
             config_overrides: dict | None = None, out: str = "", out_predictions: str = "") -> dict:
    """The script without the command line (tests call this)."""
    result = evaluation.evaluate_run(workdir, step=None if step < 0 else step, split=split or "", data=data,
                                     max_batches=max_batches, out_predictions=out_predictions,
                                     overrides=lambda c: overrides.apply(c, config_overrides or {}))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


def main(argv):
    config_overrides, rest = overrides.split_argv(argv[1:])
    if rest:
        raise app.UsageError(f"unexpected arguments: {rest}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    absl_logging.set_verbosity(absl_logging.WARNING)
    result = evaluate(FLAGS.workdir, step=FLAGS.step, split=FLAGS.split or "", data=FLAGS.data,
                      max_batches=FLAGS.max_batches, config_overrides=config_overrides, out=FLAGS.out,
                      out_predictions=FLAGS.out_predictions)  # a bad workdir/step/data/override: one line
    print(json.dumps(result))
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl parses the flags it knows; `--config.x.y=v` arguments pass through to main."""
    config_args = [a for a in argv if a.startswith("--config.")]
    return flags.FLAGS([a for a in argv if not a.startswith("--config.")]) + config_args


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'evaluate.py', parser=parse_flags)
